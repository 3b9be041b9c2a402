"""When a head counts as detected, and the option vocabularies of the detector.

Torch-free on purpose: the ``detect`` parser imports these names, and ``hf-iterheads --help`` must answer
before torch is imported.
"""

from __future__ import annotations

MIN_SCORE = 0.25
CHANCE_RATIO = 3.0
CONTROL_RATIO = 2.0
NO_CONTROL = "every head of the model is ablated: no other head remains for a random control"
CAPTURES = ("auto", "rows", "eager")
DTYPE_NAMES = ("auto", "float32", "float16", "bfloat16", "fast")  # fast: half precision where the device computes it natively
