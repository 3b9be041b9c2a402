"""Find iteration heads (paper section 8) in any causal LM, and check them causally: the detector's public face.

For every (layer, head) the detector measures, on teacher-forced CoT probes (:mod:`hf_iterheads.detect.probes`):

* ``iteration_score`` -- mean attention mass from the position predicting ``s_t`` to ``x_t`` (the
  iteration head); ``peakiness`` -- the paper's share of those attentions above 0.5. Only steps where
  ``s_t`` depends on ``x_t`` count (polynomial iteration after a 0 state does not: ``s_t = 1`` whatever
  ``x_t`` is, and a trained head skips the look-up); ``iteration_all_score`` counts every step;
* ``eoi_score`` -- mass from the positions holding ``s_t`` to EoI (the layer-1 partner of the circuit);
* controls -- the same mass on ``x_(t-1)`` and ``x_(t+1)`` (``prev_score``, ``next_score``) and the uniform
  ``baseline`` 1/(visible keys), so a score can be read as "how far above chance"; ``entropy`` -- the
  normalised attention entropy of the query rows.

Each of these is a head pattern (:mod:`.patterns`). A head is ``detected`` when its iteration score is at
least ``MIN_SCORE``, ``CHANCE_RATIO`` times the uniform baseline and ``CONTROL_RATIO`` times either neighbour
control. Layers and heads are 0-based: the paper's "layer-2 head" of a 2-layer model is layer 1.

The engine lives in modules a reader can hold, each re-exported here so existing imports keep working:
:mod:`.loading` (models), :mod:`.runner` (capture runs, shared-prefix cache), :mod:`.batching` (which probes share a
forward), :mod:`.scoring` (accumulation and scores), :mod:`.sequential` (verdicts settled early), :mod:`.result`
(``DetectionResult`` and its files), :mod:`.detector` (``IterationHeadDetector``) and :mod:`.cli` (the ``detect``
subcommand).
"""

from __future__ import annotations

from .cli import add_cli
from .cli import run as _run_cli
from .criteria import CAPTURES, CHANCE_RATIO, CONTROL_RATIO, MIN_SCORE, NO_CONTROL
from .detector import IterationHeadDetector, _mean_over_templates, _templates, detect_iteration_heads
from .loading import _HUB_ID, DTYPES, _offline, _resolve_device, check_causal, context_length, load_model, resolve_model_name
from .result import DetectionResult, _ablation_lines, write_outputs
from .runner import _StopForward, capture_runner
from .runner import forward_params as _forward_params
from .scoring import _Accumulator, _score, _visible, _window, attention_pattern, score_heads, score_sets
from .sequential import Sequential

__all__ = [
    "CAPTURES", "CHANCE_RATIO", "CONTROL_RATIO", "DTYPES", "MIN_SCORE", "NO_CONTROL", "DetectionResult",
    "IterationHeadDetector", "Sequential", "add_cli", "attention_pattern", "capture_runner", "check_causal",
    "context_length", "detect_iteration_heads", "load_model", "resolve_model_name", "score_heads", "score_sets", "write_outputs",
    "_HUB_ID", "_StopForward", "_Accumulator", "_ablation_lines", "_forward_params", "_mean_over_templates", "_offline",
    "_resolve_device", "_run_cli", "_score", "_templates", "_visible", "_window",
]
