"""Sequence accuracy, the paper's metric, as a local ``evaluate`` module (loads offline).

    import evaluate
    metric = evaluate.load("path/to/hf_iterheads/metrics/sequence_accuracy")
    metric.compute(predictions=[[3, 4, 19]], references=[[-100, 4, 19]])
    # {'sequence_accuracy': 1.0, 'token_accuracy': 1.0}

A sequence counts when every scored position is right; positions whose reference is ``ignore_index``
(-100, like the training labels up to EoI) are not scored. The logic lives in the plain function
``hf_iterheads.evaluation.sequence_accuracy``; this module only adapts it to ``evaluate``.
"""

import datasets
import evaluate

from hf_iterheads.evaluation import sequence_accuracy

_DESCRIPTION = "Share of sequences predicted right at every scored position (and the per-token share)."
_CITATION = """@inproceedings{cabannes2024iteration,
  title={Iteration Head: A Mechanistic Study of Chain-of-Thought},
  author={Cabannes, Vivien and Arnal, Charles and Bouaziz, Wassim and Yang, Alice and Charton, Francois and Kempe, Julia},
  booktitle={NeurIPS}, year={2024}}"""
_KWARGS = """
Args:
    predictions: list of token-id sequences (the argmax after EoI, or the whole sequence).
    references: list of token-id sequences of the same lengths; ``ignore_index`` marks unscored positions.
    ignore_index: reference value of unscored positions (default -100).
Returns:
    sequence_accuracy: share of sequences right at every scored position.
    token_accuracy: share of scored positions that are right.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class SequenceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS,
            features=datasets.Features(
                {"predictions": datasets.List(datasets.Value("int64")), "references": datasets.List(datasets.Value("int64"))}
            ),
        )

    def _compute(self, predictions, references, ignore_index=-100):
        return sequence_accuracy(predictions, references, ignore_index=ignore_index)
