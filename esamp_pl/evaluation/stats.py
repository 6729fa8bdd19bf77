"""Evaluation statistics: per-method summaries over the common problems, and paired comparisons.

Every method is summarised on the problems that all methods have finished, so a partial run still
compares like with like; comparisons against the reference are paired problem by problem (same
problems, same seeds), so the problems' difficulty, which the methods share, cancels out of the
standard errors.

The fair comparison: ESamp's ``(1 + beta)`` factor sharpens the distribution, which by itself
lowers both perplexity and diversity. Each method family therefore draws a curve (a temperature
sweep for a baseline, a beta sweep for ESamp), and a point only counts as better when it lies above
the reference baseline's curve at the same perplexity (interpolated in log perplexity).

The effect that counts is the one a frozen Distiller does not have: every ESamp method that learns
is compared with its *frozen twin* (the method run with the same settings but ``esamp.learn=false``),
and every non-random init with random init at the same settings, unit by unit (a unit is a problem,
or a (problem, seed) with ``eval.seeds``). Twins are found by their settings, never by their names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from esamp_pl.evaluation.metrics import pass_at_k, pass_at_k_curve
from esamp_pl.evaluation.results import record_unit

__all__ = ["FROZEN_TWIN_KEYS", "FrontierRow", "MethodSummary", "PairedDelta", "PassAtKRow", "SAMPLE_NEUTRAL_ESAMP_KEYS",
           "TwinRow", "compare_to_curve", "curve_residuals", "frontier_comparison", "frozen_twin", "paired_delta",
           "paired_difference_se", "paired_pass_at_k", "pass_at_k_against", "random_twin", "standard_error",
           "summarize", "twin_comparison", "wins_losses"]

# esamp keys that change how fast the samples come, not which: left out of resume keys and twin matching.
SAMPLE_NEUTRAL_ESAMP_KEYS = ("update_mode",)


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
    log_perplexity_per_problem: list[float] = field(default_factory=list)
    "mean log perplexity of each common unit's samples, in unit order (nan without perplexities)"
    realised_beta: float = math.nan
    "with esamp.kl_budget: mean realised beta over the counted row-steps of all batches"
    realised_kl: float = math.nan
    "with esamp.kl_budget: mean realised KL(pi_new || pi_ref) per row-step, nats"
    sampling: dict = field(default_factory=dict)
    "the method's full sampling settings (from run_info.json)"
    esamp: dict = field(default_factory=dict)
    "the method's full esamp settings (from run_info.json)"
    distiller: dict = field(default_factory=dict)
    "the method's Distiller settings (from run_info.json; empty in runs older than per-method Distillers)"


def standard_error(values) -> float:
    """Standard error of the mean (sample std / sqrt(count)); nan below two values."""
    values = np.asarray(values, dtype=float)
    return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def _nanmean(values) -> float:
    values = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def summarize(info: dict, problem_records: list[dict],
              batch_records: list[dict]) -> tuple[list[MethodSummary], list[str]]:
    """One summary per method that has results, over the units every such method finished.

    A unit is a problem, or a (problem, seed) in a run with ``eval.seeds``; the second value returned
    lists the common units in run order.
    """
    by_method: dict[str, dict[str, dict]] = {}
    for r in problem_records:
        by_method.setdefault(r["method"], {})[record_unit(r)] = r
    methods = [m for m in info["methods"] if m["name"] in by_method]
    common = set.intersection(*(set(by_method[m["name"]]) for m in methods)) if methods else set()
    order = {pid: i for i, pid in enumerate(info.get("units") or info.get("problems", []))}
    common_ids = sorted(common, key=lambda pid: order.get(pid, 0))
    n = info["n"]
    summaries = []
    for m in methods:
        records = [by_method[m["name"]][pid] for pid in common_ids]
        samples = [s for r in records for s in r["samples"]]
        esamp_on = m["esamp"].get("enabled", True)
        s = MethodSummary(name=m["name"], family=m["family"], temperature=float(m["sampling"]["temperature"]),
                          beta=float(m["esamp"].get("beta", 0.25)) if esamp_on else None, init=_init(m),
                          problems=len(records), sampling=dict(m["sampling"]), esamp=dict(m["esamp"]),
                          distiller=dict(m.get("distiller") or {}))
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
        s.log_perplexity_per_problem = [_nanmean(math.log(x["perplexity"]) for x in r["samples"]
                                                 if x.get("perplexity")) for r in records]
        s.tokens_per_sample = _nanmean(x["num_tokens"] for x in samples)
        batches = [b for b in batch_records if b["method"] == m["name"]]
        seconds = sum(b["decode_seconds"] for b in batches)
        s.tokens_per_second = sum(b["tokens_generated"] for b in batches) / seconds if seconds > 0 else math.nan
        budgets = [b["kl_budget"] for b in batches if b.get("kl_budget") and b["kl_budget"].get("row_steps")]
        if budgets:
            steps = sum(b["row_steps"] for b in budgets)
            s.realised_beta = sum(b["beta_mean"] * b["row_steps"] for b in budgets if b.get("beta_mean") is not None) / steps
            s.realised_kl = sum(b["kl_mean"] * b["row_steps"] for b in budgets if b.get("kl_mean") is not None) / steps
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


def curve_residuals(values: list[float], curve: list[tuple[float, list[float]]], ppl: float) -> np.ndarray:
    """Per-problem difference between a method's values and a curve at perplexity ``ppl`` (nan: no curve).

    ``curve`` holds (perplexity, per-problem values) of the baseline's points. The curve is
    interpolated per problem with the same weights as the aggregate (linear in log perplexity, the
    nearest end outside the range), so the mean residual equals the aggregate difference.
    """
    pts = sorted(((math.log(p), np.asarray(v, dtype=float)) for p, v in curve if math.isfinite(p) and p > 0),
                 key=lambda point: point[0])  # equal perplexities must not compare the arrays
    if not pts or not (math.isfinite(ppl) and ppl > 0):
        return np.full(len(values), math.nan)
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
    return np.asarray(values, dtype=float) - at


def paired_difference_se(values: list[float], curve: list[tuple[float, list[float]]], ppl: float) -> float:
    """Standard error of the per-problem :func:`curve_residuals`: problem difficulty, shared by the
    methods on the same prompts, cancels out of the error."""
    if len(values) < 2:
        return math.nan
    diffs = curve_residuals(values, curve, ppl)
    return standard_error(diffs[np.isfinite(diffs)])


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


# ----------------------------------------------------------------------------- twins


def _learns(s: MethodSummary) -> bool:
    return s.init is not None and bool(s.esamp.get("learn", True))


def _settings(s: MethodSummary, *, drop: tuple[str, ...]) -> tuple[str, str, str]:
    """A method's sampling, esamp and Distiller settings as comparable text, without the ``drop`` esamp keys."""
    esamp = {k: v for k, v in s.esamp.items() if k not in SAMPLE_NEUTRAL_ESAMP_KEYS + drop}
    return repr(sorted(s.sampling.items())), repr(sorted(esamp.items())), repr(sorted(s.distiller.items()))


# A Distiller that never learns has no update cadence: a frozen twin matches whatever esamp.update_every says.
FROZEN_TWIN_KEYS = ("learn", "update_every")


def frozen_twin(method: MethodSummary, summaries: list[MethodSummary]) -> MethodSummary | None:
    """The method with the same settings except ``esamp.learn=false`` (None when not run)."""
    target = _settings(method, drop=FROZEN_TWIN_KEYS)
    return next((s for s in summaries if s.init is not None and not _learns(s)
                 and _settings(s, drop=FROZEN_TWIN_KEYS) == target), None)


_INIT_KEYS = ("init", "warm_start", "warm_start_path")


def random_twin(method: MethodSummary, summaries: list[MethodSummary]) -> MethodSummary | None:
    """The method with the same settings but a random Distiller init (None when not run)."""
    target = _settings(method, drop=_INIT_KEYS)
    return next((s for s in summaries if s.init == "random" and _settings(s, drop=_INIT_KEYS) == target), None)


@dataclass(frozen=True)
class PairedDelta:
    """Mean over units of a per-unit difference, its paired standard error, and units won / lost."""

    mean: float
    se: float
    wins: int
    losses: int


def paired_delta(a, b) -> PairedDelta:
    """``a - b`` unit by unit (same units, same order), over the units where both are finite."""
    diffs = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    diffs = diffs[np.isfinite(diffs)]
    if len(diffs) == 0:
        return PairedDelta(math.nan, math.nan, 0, 0)
    return PairedDelta(float(diffs.mean()), standard_error(diffs), int((diffs > 0).sum()), int((diffs < 0).sum()))


@dataclass(frozen=True)
class TwinRow:
    """One method against its twin (frozen, or random init), unit by unit; None fields without a twin."""

    name: str
    twin: str | None
    vendi: PairedDelta | None = None
    "Vendi(method) - Vendi(twin)"
    log_perplexity: PairedDelta | None = None
    "mean log perplexity(method) - (twin), per unit"
    residual: PairedDelta | None = None
    "(Vendi - reference curve at the method's perplexity) minus the same for the twin; None without a curve"


def _twin_row(s: MethodSummary, twin: MethodSummary | None, curve) -> TwinRow:
    if twin is None:
        return TwinRow(s.name, None)
    residual = None
    if curve is not None:
        residual = paired_delta(curve_residuals(s.vendi_per_problem, curve, s.perplexity),
                                curve_residuals(twin.vendi_per_problem, curve, twin.perplexity))
    return TwinRow(s.name, twin.name, paired_delta(s.vendi_per_problem, twin.vendi_per_problem),
                   paired_delta(s.log_perplexity_per_problem, twin.log_perplexity_per_problem), residual)


def _reference_curve(summaries: list[MethodSummary], reference: str):
    """(perplexity, per-unit Vendi) of ``reference``'s points, or None with fewer than two."""
    curve_methods = [s for s in summaries if s.family == reference]
    return [(c.perplexity, c.vendi_per_problem) for c in curve_methods] if len(curve_methods) >= 2 else None


def pair_comparison(summaries: list[MethodSummary], pairs: list[tuple[str, str]], reference: str) -> list[TwinRow]:
    """``a`` minus ``b``, unit by unit, for each chosen pair (``eval.compare``), as the twin rows are; a pair with
    a method that has no results yet gets a row without figures."""
    curve = _reference_curve(summaries, reference)
    by_name = {s.name: s for s in summaries}
    return [_twin_row(by_name[a], by_name.get(b), curve) if a in by_name else TwinRow(a, None) for a, b in pairs]


def twin_comparison(summaries: list[MethodSummary], reference: str) -> tuple[list[TwinRow], list[TwinRow]]:
    """Rows against the frozen twin (every ESamp method that learns) and against random init (every
    ESamp method whose init is not random); the residual uses ``reference``'s curve when it has two points."""
    curve = _reference_curve(summaries, reference)
    frozen = [_twin_row(s, frozen_twin(s, summaries), curve) for s in summaries if _learns(s)]
    random = [_twin_row(s, random_twin(s, summaries), curve) for s in summaries
              if s.init is not None and s.init != "random"]
    return frozen, random
