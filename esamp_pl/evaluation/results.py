"""The evaluation's results file: one JSON object per line, appended batch by batch, read back safely.

``results.jsonl`` in an evaluation folder holds ``problem`` records (one per method and problem: its
samples, grades and metrics) and ``batch`` records (one per decoded batch: speed and the Distiller's
error curve); ``run_info.json`` beside it says which settings are current. An interrupted or
damaged file must not lose the rest: a line that is not UTF-8, not JSON or not a record of the
expected shape is skipped, counted and reported with its line number, and everything else is kept,
so a rerun resumes (the skipped problems are decoded again) and the report is still drawn.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_FILE", "RUN_INFO_FILE", "BadLine", "Results", "append_records", "current_records",
           "read_records", "read_results", "record_problem", "record_unit"]
log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
RUN_INFO_FILE = "run_info.json"


@dataclass(frozen=True)
class BadLine:
    """A line of the results file that was skipped, and why."""

    number: int
    "1-based line number in the file"
    reason: str


@dataclass
class Results:
    """The readable records of a results file and the lines that were skipped."""

    records: list[dict] = field(default_factory=list)
    bad_lines: list[BadLine] = field(default_factory=list)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_optional_number(value: Any) -> bool:
    return value is None or _is_number(value)


def record_problem(record: Any) -> str | None:
    """Why ``record`` is not a record the runner wrote (None when it is one)."""
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    kind = record.get("kind")
    if kind not in ("problem", "batch"):
        return f"kind {kind!r}: not 'problem' or 'batch'"
    for key in ("method", "key"):
        if not isinstance(record.get(key), str):
            return f"{kind} record without a string {key!r}"
    if kind == "problem":
        if not isinstance(record.get("problem_id"), str):
            return "problem record without a string 'problem_id'"
        if record.get("unit") is not None and not isinstance(record["unit"], str):
            return "problem record whose 'unit' is not a string"
        diversity = record.get("diversity")
        if not isinstance(diversity, dict) or not all(_is_optional_number(v) for v in diversity.values()):
            return "problem record without a 'diversity' object of numbers"
        samples = record.get("samples")
        if not isinstance(samples, list) or not all(
                isinstance(s, dict) and _is_number(s.get("num_tokens")) and _is_optional_number(s.get("perplexity"))
                for s in samples):
            return "problem record whose 'samples' are not objects with 'num_tokens' and 'perplexity'"
        correct = record.get("num_correct")
        if correct is not None and not (isinstance(correct, int) and 0 <= correct <= len(samples)):
            return f"problem record whose 'num_correct' ({correct!r}) is not a count of its {len(samples)} samples"
        return None
    if not isinstance(record.get("batch_index"), int):
        return "batch record without an integer 'batch_index'"
    if not (_is_number(record.get("decode_seconds")) and _is_number(record.get("tokens_generated"))):
        return "batch record without numeric 'decode_seconds' and 'tokens_generated'"
    curve = record.get("relative_error_per_step")
    if curve is not None and not (isinstance(curve, list) and all(_is_optional_number(v) for v in curve)):
        return "batch record whose 'relative_error_per_step' is not a list of numbers"
    if not _is_optional_number(record.get("distiller_updates")):
        return "batch record whose 'distiller_updates' is not a number"
    return None


def record_unit(record: dict) -> str:
    """The paired unit of a problem record: ``<problem id>@seed<s>`` with ``eval.seeds``, else the problem id."""
    return record.get("unit") or record["problem_id"]


def read_results(path: Path) -> Results:
    """Every well-formed record of a results file, and the skipped lines with their numbers and reasons."""
    results = Results()
    if not path.is_file():
        return results
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            reason = f"not UTF-8 ({err.reason} at byte {err.start}: a torn character?)"
        except json.JSONDecodeError as err:
            reason = f"not JSON ({err.msg}: a torn line?)"
        else:
            reason = record_problem(record)
            if reason is None:
                results.records.append(record)
                continue
        results.bad_lines.append(BadLine(number, reason))
    if results.bad_lines:
        log.warning("%s: skipped %d unreadable line(s): %s", path, len(results.bad_lines),
                    "; ".join(f"line {b.number}: {b.reason}" for b in results.bad_lines[:10])
                    + (" ..." if len(results.bad_lines) > 10 else ""))
    return results


def read_records(path: Path) -> list[dict]:
    """The well-formed records of a results file (skipped lines are logged)."""
    return read_results(path).records


def append_records(path: Path, records: list[dict]) -> None:
    """Append records as JSON lines; a torn last line (interrupted write) is ended first."""
    torn = False
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as existing:
            existing.seek(-1, 2)
            torn = existing.read(1) != b"\n"
    with path.open("a", encoding="utf-8") as sink:
        if torn:  # end the half line, so that the next record starts cleanly
            sink.write("\n")
        for record in records:
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
        sink.flush()


def current_records(out_dir: Path) -> tuple[dict, list[dict], list[dict], list[BadLine]]:
    """Run info, the current problem records (the last per method and problem), batch records, skipped lines.

    Current = written with the key ``run_info.json`` gives the method now; others are another run's.
    Problem records are kept per (method, unit), batch records per (method, base seed, batch).
    """
    info = json.loads((out_dir / RUN_INFO_FILE).read_text())
    keys = {m["name"]: m["key"] for m in info["methods"]}
    problems: dict[tuple[str, str], dict] = {}
    batches: dict[tuple[str, int], dict] = {}
    results = read_results(out_dir / RESULTS_FILE)
    for record in results.records:
        if keys.get(record["method"]) != record["key"]:
            continue  # another run's settings, or a method no longer listed
        if record["kind"] == "problem":
            problems[(record["method"], record_unit(record))] = record
        else:
            batches[(record["method"], record.get("base_seed"), record["batch_index"])] = record
    return info, list(problems.values()), list(batches.values()), results.bad_lines

