"""The evaluation report: per-method table, pass@k against the reference, the fair comparison.

Reads ``results.jsonl`` and ``run_info.json`` of an evaluation folder (written by
:mod:`esamp_pl.evaluation.runner`, read by :mod:`esamp_pl.evaluation.results`) and writes
``report.md`` with the PNGs of :mod:`esamp_pl.evaluation.plots` next to them. The numbers come from
:mod:`esamp_pl.evaluation.stats`; this module only lays them out. Only records of the current
settings count, and every method is scored on the problems that all methods have finished.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from esamp_pl.evaluation.plots import plot_all
from esamp_pl.evaluation.results import RESULTS_FILE, current_records
from esamp_pl.evaluation.stats import (MethodSummary, PairedDelta, TwinRow, frontier_comparison, pair_comparison,
                                       pass_at_k_against, summarize, twin_comparison)

__all__ = ["write_report"]


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(summaries: list[MethodSummary], graded: bool) -> list[str]:
    ks = sorted({k for s in summaries for k in s.pass_at_k}) if graded else []
    head = ["method", "T", "beta", "init", "units"] + [f"pass@{k}" for k in ks] + [
        "Vendi ↑", "mean cos ↓", "distinct-2 ↑", "ppl ↓ (geo)", "ppl median", "tokens/sample", "tok/s",
        "Distiller rel. err step 1 → last", "realised beta / KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # Where the run's Distillers differ in width (a method's `distiller` overrides), the init says which.
    show_rank = len({s.distiller.get("rank") for s in summaries if s.init is not None}) > 1
    for s in summaries:
        init = f"{s.init} r{s.distiller.get('rank')}" if show_rank and s.init is not None else s.init or "-"
        err = (f"{s.relative_error_first:.3f} → {s.relative_error_last:.3f}"
               if math.isfinite(s.relative_error_first) else "-")
        budget = s.esamp.get("kl_budget") if s.beta is not None else None
        beta = f"KL {budget:g}" if budget is not None else _fmt(s.beta, 2)  # a budget decides beta per row
        row = [f"`{s.name}`", _fmt(s.temperature, 2), beta, init, str(s.problems)]
        row += [_fmt(s.pass_at_k.get(k)) for k in ks]
        row += [f"{_fmt(s.vendi)} ± {_fmt(s.vendi_se)}", _fmt(s.mean_cosine), _fmt(s.distinct_2),
                _fmt(s.perplexity, 2), _fmt(s.perplexity_median, 2), _fmt(s.tokens_per_sample, 1),
                _fmt(s.tokens_per_second, 1), err,
                f"{_fmt(s.realised_beta)} / {_fmt(s.realised_kl, 4)}" if math.isfinite(s.realised_beta) else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _fair_comparison(summaries: list[MethodSummary], reference: str) -> list[str]:
    frontier = frontier_comparison(summaries, reference)
    if frontier is None:
        return [f"The reference family `{reference}` has fewer than two points (sweep its temperature with "
                "`eval.sweeps`), so no curve to compare against."]
    curve_methods, rows = frontier
    lines = [f"Reference curve: `{reference}` at T = "
             + ", ".join(_fmt(s.temperature, 2) for s in sorted(curve_methods, key=lambda s: s.temperature))
             + ". Each other method's Vendi is compared with the curve's Vendi at the same perplexity "
               "(linear in log perplexity). ± is the paired standard error over problems (the curve "
               "interpolated per problem with the same weights), so shared prompt difficulty cancels.", "",
             "| method | ppl | Vendi | curve's Vendi at that ppl | difference ± paired s.e. | position |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        diff = f"{row.delta:+.3f} ± {_fmt(row.se)}" if row.delta is not None else "-"
        position = row.position + (" (within 2 s.e.)" if row.within_2se else "")
        lines.append(f"| `{row.name}` | {_fmt(row.perplexity, 2)} | {_fmt(row.vendi)} | {_fmt(row.curve_vendi)} "
                     f"| {diff} | {position} |")
    return lines


def _pass_at_k_comparison(summaries: list[MethodSummary], reference: str, n: int) -> list[str]:
    comparison = pass_at_k_against(summaries, reference, n)
    if comparison is None:
        return [f"No `{reference}` results to compare pass@k against."]
    ks, rows = comparison
    lines = [f"Each method minus `{reference}`, problem by problem (same problems, same seeds); ± is the paired "
             "standard error over problems. wins / losses: problems with more / fewer correct samples.", "",
             "| method | " + " | ".join(f"Δ pass@{k}" for k in ks) + " | wins / losses |",
             "|---|" + "---|" * len(ks) + "---|"]
    for row in rows:
        cells = [f"{row.deltas[k][0]:+.3f} ± {_fmt(row.deltas[k][1])}" for k in ks]
        lines.append(f"| `{row.name}` | " + " | ".join(cells) + f" | {row.wins} / {row.losses} |")
    return lines


def _delta(d: PairedDelta | None) -> str:
    if d is None or not math.isfinite(d.mean):
        return "-"
    return f"{d.mean:+.3f} ± {_fmt(d.se)} ({d.wins} / {d.losses})"


def _twin_table(rows: list[TwinRow], what: str) -> list[str]:
    lines = [f"| method | {what} | Δ Vendi (wins / losses) | Δ log ppl | Δ curve residual (wins / losses) |",
             "|---|---|---|---|---|"]
    for row in rows:
        if row.twin is None:
            lines.append(f"| `{row.name}` | none run | - | - | - |")
        else:
            lines.append(f"| `{row.name}` | `{row.twin}` | {_delta(row.vendi)} | {_delta(row.log_perplexity)} "
                         f"| {_delta(row.residual)} |")
    return lines


def _twin_section(summaries: list[MethodSummary], reference: str) -> list[str]:
    frozen, random = twin_comparison(summaries, reference)
    if not frozen and not random:
        return ["No ESamp method that learns or uses a non-random init was run."]
    lines = ["Each method minus its twin, unit by unit (same problems, same seeds): the frozen twin has the same "
             "settings with `esamp.learn=false`, so what is left is what learning adds; twins are found by their "
             "settings. ± is the paired standard error over units; wins / losses count units above / below the "
             f"twin. Curve residual: Vendi minus `{reference}`'s curve at the method's own perplexity, so a twin "
             "that only trades perplexity for diversity along the curve gains nothing there.", ""]
    if frozen:
        lines += ["### Frozen twin (what learning adds)", ""] + _twin_table(frozen, "frozen twin") + [""]
    if random:
        lines += ["### Against random init at the same settings", ""] + _twin_table(random, "random-init twin") + [""]
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
             f"- task `{info['task']}`, "
             + (f"units (problem x seed, seeds {info['seeds']}): {len(common)} common to all methods (of "
                f"{len(info.get('units') or [])}; " if info.get("seeds") else
                f"problems: {len(common)} common to all methods (of ")
             + f"{len(info['problems'])} problems selected; eval.limit={cfg.get('eval', {}).get('limit')}"
             + (f"; the user's prompts from `{cfg['eval']['prompts']}`)" if cfg.get("eval", {}).get("prompts")
                else ")"),
             f"- model `{info['model']}`, n = {info['n']} samples per problem, seed = "
             f"{', '.join(map(str, info['seeds'])) if info.get('seeds') else info['seed']} (batch b uses "
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
    lines += ["## Against the frozen twin", ""] + _twin_section(summaries, reference)
    pairs = [(str(a), str(b)) for a, b in (cfg.get("eval", {}).get("compare") or [])]
    if pairs:
        lines += ["## Chosen pairs (`eval.compare`)", "",
                  "The first method minus the second, unit by unit, with the same columns as the twin tables.", ""]
        lines += _twin_table(pair_comparison(summaries, pairs, reference), "minus") + [""]
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
