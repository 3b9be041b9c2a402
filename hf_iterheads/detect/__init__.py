"""Head detection in any causal LM: probes, attention capture, scores, ablation (nothing here trains)."""
