"""Evaluation statistics: per-method summaries over the common problems, and paired comparisons.

Every method is summarised on the problems that all methods have finished, so a partial run still
compares like with like; comparisons against the reference are paired problem by problem (same
problems, same seeds), so the problems' difficulty, which the methods share, cancels out of the
standard errors.

The fair comparison: ESamp's ``(1 + beta)`` factor sharpens the distribution, which by itself
lowers both perplexity and diversity. Each method family therefore draws a curve (a temperature
sweep for a baseline, a beta sweep for ESamp), and a point only counts as better when it lies above
the reference baseline's curve at the same perplexity (interpolated in log perplexity).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from esamp_pl.evaluation.metrics import pass_at_k, pass_at_k_curve

__all__ = ["FrontierRow", "MethodSummary", "PassAtKRow", "compare_to_curve", "frontier_comparison",
           "paired_difference_se", "paired_pass_at_k", "pass_at_k_against", "standard_error", "summarize",
           "wins_losses"]


@dataclass
class MethodSummary:
    """Aggregated numbers of one method over the common problems."""

    name: str
    family: str
    temperature: float
    beta: float | None
    "None for plain sampling"
    init: str | None
    problems: int
    pass_at_k: dict[int, float] = field(default_factory=dict)
    num_correct_per_problem: list[int] = field(default_factory=list)
    "correct samples (of n) per common problem, in problem order (for paired comparisons)"
    vendi: float = math.nan
    "mean over problems of the Vendi score of that problem's n samples (higher = more diverse)"
    vendi_se: float = math.nan
    "standard error of that mean over problems"
    vendi_per_problem: list[float] = field(default_factory=list)
    "Vendi score per common problem, in problem order (for paired comparisons)"
    mean_cosine: float = math.nan
    distinct_2: float = math.nan
    perplexity: float = math.nan
    "geometric mean over samples of the per-sample perplexity under the scorer (lower = more coherent)"
    perplexity_median: float = math.nan
    tokens_per_sample: float = math.nan
    tokens_per_second: float = math.nan
    distiller_updates: int | None = None
    relative_error_first: float = math.nan
    "Distiller relative error at the first decode step, mean over batches"
    relative_error_last: float = math.nan
    relative_error_curve: list[float] = field(default_factory=list)
    "mean relative error per decode step over batches (steps all batches reached)"


def standard_error(values) -> float:
    """Standard error of the mean (sample std / sqrt(count)); nan below two values."""
    values = np.asarray(values, dtype=float)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(info: dict, problem_records: list[dict],
              batch_records: list[dict]) -> tuple[list[MethodSummary], list[str]]:
    """One summary per method that has results, over the problems every such method finished."""
    by_method: dict[str, dict[str, dict]] = {}
    for r in problem_records:
        by_method.setdefault(r["method"], {})[r["problem_id"]] = r
    methods = [m for m in info["methods"] if m["name"] in by_method]
    common = set.intersection(*(set(by_method[m["name"]]) for m in methods)) if methods else set()
    order = {pid: i for i, pid in enumerate(info.get("problems", []))}
    common_ids = sorted(common, key=lambda pid: order.get(pid, 0))
    n = info["n"]
    summaries = []
    for m in methods:
        records = [by_method[m["name"]][pid] for pid in common_ids]
        samples = [s for r in records for s in r["samples"]]
        esamp_on = m["esamp"].get("enabled", True)
        s = MethodSummary(name=m["name"], family=m["family"], temperature=float(m["sampling"]["temperature"]),
                          beta=float(m["esamp"].get("beta", 0.25)) if esamp_on else None, init=_init(m),
                          problems=len(records))
        if records and records[0].get("num_correct") is not None:
            s.num_correct_per_problem = [int(r["num_correct"]) for r in records]
            s.pass_at_k = pass_at_k_curve(s.num_correct_per_problem, n)
        vendis = [r["diversity"].get("vendi") for r in records]
        s.vendi_per_problem = [math.nan if v is None else float(v) for v in vendis]
        s.vendi = _nanmean(vendis)
        finite = [v for v in vendis if v is not None]
        s.vendi_se = standard_error(finite)
        s.mean_cosine = _nanmean(r["diversity"].get("mean_cosine") for r in records)
        s.distinct_2 = _nanmean(r["diversity"].get("distinct_2") for r in records)
        ppl = [x["perplexity"] for x in samples if x.get("perplexity")]
        if ppl:
            s.perplexity = float(np.exp(np.mean(np.log(ppl))))
            s.perplexity_median = float(np.median(ppl))
        s.tokens_per_sample = _nanmean(x["num_tokens"] for x in samples)
        batches = [b for b in batch_records if b["method"] == m["name"]]
        seconds = sum(b["decode_seconds"] for b in batches)
        s.tokens_per_second = sum(b["tokens_generated"] for b in batches) / seconds if seconds > 0 else math.nan
        curves = [b["relative_error_per_step"] for b in batches if b.get("relative_error_per_step")]
        if curves:
            s.distiller_updates = int(sum(b.get("distiller_updates") or 0 for b in batches))
            s.relative_error_first = _nanmean(c[0] for c in curves)
            s.relative_error_last = _nanmean(c[-1] for c in curves)
            steps = min(len(c) for c in curves)
            s.relative_error_curve = [float(np.mean([c[t] for c in curves])) for t in range(steps)]
        summaries.append(s)
    return summaries, common_ids


def _init(method: dict) -> str | None:
    esamp = method["esamp"]
    if not esamp.get("enabled", True) or esamp.get("mode", "esamp") != "esamp":
        return None
    return "warm" if esamp.get("warm_start") else esamp.get("init", "random")


def compare_to_curve(point: tuple[float, float], curve: list[tuple[float, float]]) -> tuple[str, float | None]:
    """Where a (perplexity, diversity) point lies relative to a baseline's curve of such points.

    Inside the curve's perplexity range the curve is interpolated linearly in log perplexity and the
    answer is ``above`` / ``below`` with the diversity difference. Outside it, a point with lower
    perplexity *and* more diversity than the curve's nearest end is ``above`` (it dominates), one
    with higher perplexity and less diversity is ``below``; anything else is ``outside``.
    """
    pts = sorted((math.log(p), d) for p, d in curve if math.isfinite(p) and p > 0 and math.isfinite(d))
    ppl, div = point
    if not pts or not (math.isfinite(ppl) and ppl > 0 and math.isfinite(div)):
        return "n/a", None
    x = math.log(ppl)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if xs[0] <= x <= xs[-1]:
        delta = div - float(np.interp(x, xs, ys))
        return ("above" if delta > 0 else "below"), delta
    end = ys[0] if x < xs[0] else ys[-1]
    delta = div - end
    if x < xs[0] and delta > 0:
        return "above", delta
    if x > xs[-1] and delta < 0:
        return "below", delta
    return "outside", delta


def paired_difference_se(values: list[float], curve: list[tuple[float, list[float]]], ppl: float) -> float:
    """Standard error of the per-problem difference between a method and a curve at perplexity ``ppl``.

    ``curve`` holds (perplexity, per-problem values) of the baseline's points. The curve is
    interpolated per problem with the same weights as the aggregate (linear in log perplexity, the
    nearest end outside the range), so the mean difference equals the aggregate one while problem
    difficulty, shared by the methods on the same prompts, cancels out of the error.
    """
    pts = sorted(((math.log(p), np.asarray(v, dtype=float)) for p, v in curve if math.isfinite(p) and p > 0),
                 key=lambda point: point[0])  # equal perplexities must not compare the arrays
    if not pts or not (math.isfinite(ppl) and ppl > 0) or len(values) < 2:
        return math.nan
    x = math.log(ppl)
    xs = [p[0] for p in pts]
    if x <= xs[0]:
        at = pts[0][1]
    elif x >= xs[-1]:
        at = pts[-1][1]
    else:
        j = max(i for i in range(len(xs) - 1) if xs[i] <= x)
        w = (x - xs[j]) / (xs[j + 1] - xs[j]) if xs[j + 1] > xs[j] else 0.0
        at = (1 - w) * pts[j][1] + w * pts[j + 1][1]
    diffs = np.asarray(values, dtype=float) - at
    diffs = diffs[np.isfinite(diffs)]
    return standard_error(diffs)


def paired_pass_at_k(method: list[int], reference: list[int], n: int, k: int) -> tuple[float, float]:
    """Mean and standard error over problems of pass@k(method) - pass@k(reference), problem by problem.

    Both lists hold the correct-sample counts of the same problems in the same order; pairing removes
    the problems' difficulty, which the two methods share, from the error.
    """
    if len(method) != len(reference):
        raise ValueError(f"{len(method)} vs {len(reference)} problems: pair the same problems")
    diffs = np.array([pass_at_k(n, a, k) - pass_at_k(n, b, k) for a, b in zip(method, reference)], dtype=float)
    if len(diffs) == 0:
        return math.nan, math.nan
    se = standard_error(diffs)
    return float(diffs.mean()), se




def wins_losses(method: list[int], reference: list[int]) -> tuple[int, int]:
    """Problems where the method has more / fewer correct samples than the reference (same problem order)."""
    return sum(a > b for a, b in zip(method, reference)), sum(a < b for a, b in zip(method, reference))


@dataclass(frozen=True)
class PassAtKRow:
    """One method against the reference: pass@k differences and wins/losses, problem by problem."""

    name: str
    deltas: dict[int, tuple[float, float]]
    "k -> (mean over problems of pass@k(method) - pass@k(reference), its paired standard error)"
    wins: int
    losses: int


def pass_at_k_against(summaries: list[MethodSummary], reference: str,
                      n: int) -> tuple[list[int], list[PassAtKRow]] | None:
    """The ks and one row per other graded method; None without graded results of ``reference``."""
    base = next((s for s in summaries if s.name == reference), None)
    if base is None or not base.num_correct_per_problem:
        return None
    ks = sorted(base.pass_at_k)
    rows = []
    for s in summaries:
        if s.name == reference or not s.num_correct_per_problem:
            continue
        deltas = {k: paired_pass_at_k(s.num_correct_per_problem, base.num_correct_per_problem, n, k) for k in ks}
        rows.append(PassAtKRow(s.name, deltas, *wins_losses(s.num_correct_per_problem, base.num_correct_per_problem)))
    return ks, rows


@dataclass(frozen=True)
class FrontierRow:
    """Where one method's (perplexity, Vendi) point lies against the reference family's curve."""

    name: str
    perplexity: float
    vendi: float
    position: str
    "above / below / outside / n/a (see compare_to_curve)"
    delta: float | None
    "Vendi minus the curve's Vendi at the same perplexity (or its nearest end)"
    curve_vendi: float | None
    se: float
    "paired standard error of ``delta`` over problems"

    @property
    def within_2se(self) -> bool:
        """Above or below the curve, but by no more than two standard errors."""
        return self.delta is not None and self.position in ("above", "below") and not abs(self.delta) > 2 * self.se


def frontier_comparison(summaries: list[MethodSummary],
                        reference: str) -> tuple[list[MethodSummary], list[FrontierRow]] | None:
    """The reference family's points and one row per other method; None below two reference points."""
    curve_methods = [s for s in summaries if s.family == reference]
    if len(curve_methods) < 2:
        return None
    curve = [(s.perplexity, s.vendi) for s in curve_methods]
    per_problem = [(s.perplexity, s.vendi_per_problem) for s in curve_methods]
    rows = []
    for s in summaries:
        if s.family == reference:
            continue
        position, delta = compare_to_curve((s.perplexity, s.vendi), curve)
        rows.append(FrontierRow(s.name, s.perplexity, s.vendi, position, delta,
                                s.vendi - delta if delta is not None else None,
                                paired_difference_se(s.vendi_per_problem, per_problem, s.perplexity)))
    return curve_methods, rows
