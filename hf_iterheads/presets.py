"""Model presets: the paper's model and its ablations, as plain values (no torch, so the CLI checks them fast)."""

# Presets: the paper's model and the ablations of its section 5 / figures. Widths other than these are one
# ``--n-embd`` away (n_inner follows as 4 * n_embd unless given).
PRESETS: dict[str, dict] = {
    "paper": dict(n_layer=2, n_head=1, n_embd=128),
    "1layer": dict(n_layer=1, n_head=1, n_embd=128),  # one layer cannot host the two-step circuit
    "3layer": dict(n_layer=3, n_head=1, n_embd=128),
    "4head": dict(n_layer=2, n_head=4, n_embd=128),  # the circuit then spreads over heads
    "3layer-4head": dict(n_layer=3, n_head=4, n_embd=128),
    "frozen-pos": dict(n_layer=2, n_head=1, n_embd=128, freeze_positions=True),  # random, never-trained positions
    "width16": dict(n_layer=2, n_head=1, n_embd=16),
    "width32": dict(n_layer=2, n_head=1, n_embd=32),
    "width64": dict(n_layer=2, n_head=1, n_embd=64),
    "width256": dict(n_layer=2, n_head=1, n_embd=256),
    "tiny": dict(n_layer=2, n_head=1, n_embd=32),  # for tests and smoke runs
}
