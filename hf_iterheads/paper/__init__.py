"""The paper's experiments: reproduce its findings, report them, release the checkpoints."""
