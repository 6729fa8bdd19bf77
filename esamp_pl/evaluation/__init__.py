"""Evaluation building blocks: tasks and graders, answer extraction, code execution, metrics.

Import the pieces from their modules (``esamp_pl.evaluation.tasks``, ``.metrics``, ``.answers``,
``.execution``); the common ones are re-exported here. Nothing here loads a model on import.
``.runner`` (methods x problems through the decode engine, JSONL with resume; ``scripts/evaluate.py``),
``.results`` (the results file, read back line by line), ``.stats`` (summaries and paired comparisons),
``.plots`` and ``.report`` (the markdown report) build on them.
"""

from esamp_pl.evaluation.metrics import (
    Embedder,
    distinct_n,
    diversity_metrics,
    mean_pairwise_cosine,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_ks,
    perplexities,
    perplexities_from_ids,
    vendi_score,
)
from esamp_pl.evaluation.tasks import GRADED_TASKS, TASKS, Problem, grade, grade_many, is_graded, load_task

__all__ = [
    "Embedder",
    "GRADED_TASKS",
    "Problem",
    "TASKS",
    "distinct_n",
    "diversity_metrics",
    "grade",
    "grade_many",
    "is_graded",
    "load_task",
    "mean_pairwise_cosine",
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_ks",
    "perplexities",
    "perplexities_from_ids",
    "vendi_score",
]
