"""The evaluation report: per-method table, the fair diversity-vs-perplexity comparison, PNG plots.

Reads ``results.jsonl`` and ``run_info.json`` of an evaluation folder (written by
:mod:`esamp_pl.evaluation.runner`) and writes ``report.md``, ``pass_at_k.png`` (graded tasks),
``diversity_vs_perplexity.png`` and ``distiller_error.png`` next to them. Only records of the
current settings count, and every method is scored on the problems that all methods have finished,
so a partial run still compares like with like.

The fair comparison: ESamp's ``(1 + beta)`` factor sharpens the distribution, which by itself
lowers both perplexity and diversity. Each method family therefore draws a curve (a temperature
sweep for a baseline, a beta sweep for ESamp), and a point only counts as better when it lies above
the reference baseline's curve at the same perplexity (interpolated in log perplexity).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from esamp_pl.evaluation.metrics import pass_at_k, pass_at_k_curve
from esamp_pl.evaluation.results import RESULTS_FILE, RUN_INFO_FILE, current_records, read_records

__all__ = ["MethodSummary", "compare_to_curve", "paired_difference_se", "read_records", "summarize", "write_report"]
log = logging.getLogger(__name__)



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


# ----------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(summaries: list[MethodSummary], graded: bool) -> list[str]:
    ks = sorted({k for s in summaries for k in s.pass_at_k}) if graded else []
    head = ["method", "T", "beta", "init", "problems"] + [f"pass@{k}" for k in ks] + [
        "Vendi ↑", "mean cos ↓", "distinct-2 ↑", "ppl ↓ (geo)", "ppl median", "tokens/sample", "tok/s",
        "Distiller rel. err step 1 → last"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        err = (f"{s.relative_error_first:.3f} → {s.relative_error_last:.3f}"
               if math.isfinite(s.relative_error_first) else "-")
        row = [f"`{s.name}`", _fmt(s.temperature, 2), _fmt(s.beta, 2), s.init or "-", str(s.problems)]
        row += [_fmt(s.pass_at_k.get(k)) for k in ks]
        row += [f"{_fmt(s.vendi)} ± {_fmt(s.vendi_se)}", _fmt(s.mean_cosine), _fmt(s.distinct_2),
                _fmt(s.perplexity, 2), _fmt(s.perplexity_median, 2), _fmt(s.tokens_per_sample, 1),
                _fmt(s.tokens_per_second, 1), err]
        lines.append("| " + " | ".join(row) + " |")
    return lines


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


def _fair_comparison(summaries: list[MethodSummary], reference: str) -> list[str]:
    curve_methods = [s for s in summaries if s.family == reference]
    if len(curve_methods) < 2:
        return [f"The reference family `{reference}` has fewer than two points (sweep its temperature with "
                "`eval.sweeps`), so no curve to compare against."]
    curve = [(s.perplexity, s.vendi) for s in curve_methods]
    per_problem = [(s.perplexity, s.vendi_per_problem) for s in curve_methods]
    lines = [f"Reference curve: `{reference}` at T = "
             + ", ".join(_fmt(s.temperature, 2) for s in sorted(curve_methods, key=lambda s: s.temperature))
             + ". Each other method's Vendi is compared with the curve's Vendi at the same perplexity "
               "(linear in log perplexity). ± is the paired standard error over problems (the curve "
               "interpolated per problem with the same weights), so shared prompt difficulty cancels.", "",
             "| method | ppl | Vendi | curve's Vendi at that ppl | difference ± paired s.e. | position |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        if s.family == reference:
            continue
        position, delta = compare_to_curve((s.perplexity, s.vendi), curve)
        at = s.vendi - delta if delta is not None else None
        se = paired_difference_se(s.vendi_per_problem, per_problem, s.perplexity)
        diff = f"{delta:+.3f} ± {_fmt(se)}" if delta is not None else "-"
        if delta is not None and position in ("above", "below") and not abs(delta) > 2 * se:
            position += " (within 2 s.e.)"
        lines.append(f"| `{s.name}` | {_fmt(s.perplexity, 2)} | {_fmt(s.vendi)} | {_fmt(at)} | {diff} | {position} |")
    return lines


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


def _pass_at_k_comparison(summaries: list[MethodSummary], reference: str, n: int) -> list[str]:
    base = next((s for s in summaries if s.name == reference), None)
    if base is None or not base.num_correct_per_problem:
        return [f"No `{reference}` results to compare pass@k against."]
    ks = sorted(base.pass_at_k)
    lines = [f"Each method minus `{reference}`, problem by problem (same problems, same seeds); ± is the paired "
             "standard error over problems. wins / losses: problems with more / fewer correct samples.", "",
             "| method | " + " | ".join(f"Δ pass@{k}" for k in ks) + " | wins / losses |",
             "|---|" + "---|" * len(ks) + "---|"]
    for s in summaries:
        if s.name == reference or not s.num_correct_per_problem:
            continue
        cells = []
        for k in ks:
            mean, se = paired_pass_at_k(s.num_correct_per_problem, base.num_correct_per_problem, n, k)
            cells.append(f"{mean:+.3f} ± {_fmt(se)}")
        wins = sum(a > b for a, b in zip(s.num_correct_per_problem, base.num_correct_per_problem))
        losses = sum(a < b for a, b in zip(s.num_correct_per_problem, base.num_correct_per_problem))
        lines.append(f"| `{s.name}` | " + " | ".join(cells) + f" | {wins} / {losses} |")
    return lines


def write_report(out_dir: str | Path) -> Path:
    """Write report.md and the PNG plots into ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    info, problem_records, batch_records, bad_lines = current_records(out_dir)
    summaries, common = summarize(info, problem_records, batch_records)
    cfg = info.get("config", {})
    graded = any(s.pass_at_k for s in summaries)
    plots = plot_all(out_dir, summaries, graded)
    ks = sorted({k for s in summaries for k in s.pass_at_k})
    if cfg.get("perplexity", True) is False:
        scorer = "none (perplexity=false)"
    else:
        scorer = cfg.get("scorer") or f"{info['model']} (the generating model, exact token ids)"
    lines = [f"# Evaluation: {info['task']} on {info['model']}", "",
             f"- task `{info['task']}`, problems: {len(common)} common to all methods (of {len(info['problems'])} "
             f"selected; eval.limit={cfg.get('eval', {}).get('limit')}"
             + (f"; the user's prompts from `{cfg['eval']['prompts']}`)" if cfg.get("eval", {}).get("prompts")
                else ")"),
             f"- model `{info['model']}`, n = {info['n']} samples per problem, seed = {info['seed']} (batch b uses "
             f"seed + b, the same for every method), max_new_tokens = {info['max_new_tokens']}",
             f"- k = {', '.join(map(str, ks))} (unbiased pass@k)" if ks
             else "- no grader: diversity and perplexity only",
             f"- perplexity scorer: {scorer}; diversity: per problem over its n samples (all-MiniLM-L6-v2 "
             "embeddings), then averaged over problems"]
    if info["task"] == "humaneval":
        sandbox = cfg.get("sandbox", "bwrap")
        lines.append(f"- code executed with sandbox = {sandbox}"
                     + (" (bubblewrap namespaces)" if sandbox == "bwrap" else " (weaker: no network/file isolation)"))
    lines += ["", "## Results", ""] + _table(summaries, graded) + [""]
    reference = cfg.get("eval", {}).get("reference_family", "min_p0.1")
    if graded:
        lines += [f"## pass@k against `{reference}`", ""] + _pass_at_k_comparison(summaries, reference, info["n"])
        lines.append("")
    lines += ["## Fair comparison: diversity vs perplexity", ""] + _fair_comparison(summaries, reference) + [""]
    skipped = info.get("skipped") or {}
    missing = [m["name"] for m in info["methods"] if m["name"] not in {s.name for s in summaries}
               and m["name"] not in skipped]
    if skipped or missing:
        lines += ["## Methods not run", ""]
        lines += [f"- `{name}`: skipped: {reason}" for name, reason in skipped.items()]
        lines += [f"- `{name}`: no results yet (interrupted run? rerun the same command to resume)" for name in missing]
        lines.append("")
    if bad_lines:
        lines += [f"## Skipped lines of {RESULTS_FILE}", "",
                  f"{len(bad_lines)} line(s) could not be read and were left out (a rerun decodes again any problem "
                  "whose record was lost):", ""]
        lines += [f"- line {b.number}: {b.reason}" for b in bad_lines] + [""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------------- plots


def plot_all(out_dir: Path, summaries: list[MethodSummary], graded: bool) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    paths = []
    if graded and summaries:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in summaries:
            ks = sorted(s.pass_at_k)
            ax.plot(ks, [s.pass_at_k[k] for k in ks], marker="o", label=s.name,
                    linestyle="-" if "@" not in s.name else "--")
        ax.set_xscale("log", base=2)
        _label(ax, "k", "pass@k", "pass@k per method")
        paths.append(_save(fig, out_dir / "pass_at_k.png"))
    if any(math.isfinite(s.perplexity) for s in summaries):
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        families: dict[str, list[MethodSummary]] = {}
        for s in summaries:
            families.setdefault(s.family, []).append(s)
        for ax, (attr, label) in zip(axes, (("vendi", "Vendi score ↑"), ("distinct_2", "distinct-2 ↑"))):
            for family, members in families.items():
                members = sorted(members, key=lambda s: s.perplexity)
                xs = [s.perplexity for s in members]
                ys = [getattr(s, attr) for s in members]
                line, = ax.plot(xs, ys, marker="o" if members[0].beta is None else "s", label=family,
                                linestyle="-" if len(members) > 1 else "none")
                for s in members:
                    if "@" in s.name or len(members) > 1:
                        tag = f"T{s.temperature:g}" if s.beta is None else f"β{s.beta:g}"
                        if s.beta is not None and s.temperature != 1.0:
                            tag += f",T{s.temperature:g}"
                        ax.annotate(tag, (s.perplexity, getattr(s, attr)), fontsize=6, color=line.get_color(),
                                    xytext=(3, 3), textcoords="offset points")
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("perplexity under the scorer (geo. mean) ↓")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle("diversity vs perplexity per method family (up-left is better)")
        paths.append(_save(fig, out_dir / "diversity_vs_perplexity.png"))
    learners = [s for s in summaries if s.relative_error_curve]
    if learners:
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in learners:
            ax.plot(range(1, len(s.relative_error_curve) + 1), s.relative_error_curve, label=s.name)
        _label(ax, "decode step", "Distiller relative error ||h - f(s)||² / ||h||²",
               "Distiller error during generation (mean over batches)")
        paths.append(_save(fig, out_dir / "distiller_error.png"))
    return paths


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
