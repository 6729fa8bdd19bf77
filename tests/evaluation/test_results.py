"""results.jsonl read back safely: torn characters and lines, and well-formed lines of the wrong shape."""

import json
import logging
from pathlib import Path

import pytest

from esamp_pl.evaluation.report import write_report
from esamp_pl.evaluation.results import read_records, read_results
from esamp_pl.evaluation.runner import finished_problems


def _problem(method: str, pid: str) -> dict:
    return {"kind": "problem", "method": method, "key": "k1", "problem_id": pid, "num_correct": None,
            "diversity": {"vendi": 1.5, "mean_cosine": 0.5, "distinct_2": 0.8},
            "samples": [{"text": "café", "num_tokens": 3, "perplexity": 4.0, "correct": None}]}


def _batch(method: str) -> dict:
    return {"kind": "batch", "method": method, "key": "k1", "batch_index": 0, "decode_seconds": 1.0,
            "tokens_generated": 3, "distiller_updates": None, "relative_error_per_step": None}


def _line(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


WRONG_SHAPES = [
    [1, 2],                                                      # JSON, not an object
    "a string",
    {"kind": "problem", "problem_id": "p9"},                     # no method / key: KeyError before
    {**_problem("m", "p9"), "diversity": None},                  # AttributeError (None.get) before
    {**_problem("m", "p9"), "samples": [{"num_tokens": "many"}]},
    {**_problem("m", "p9"), "num_correct": 2},                   # more correct than samples: pass@k raises
    {**_batch("m"), "decode_seconds": None},
    {"kind": "comment", "method": "m", "key": "k1"},
]


def _folder(tmp_path: Path, damage: bytes) -> Path:
    info = {"task": "creative", "model": "tiny", "n": 1, "seed": 0, "max_new_tokens": 4,
            "problems": ["p0", "p1"], "skipped": {}, "config": {},
            "methods": [{"name": "m", "family": "m", "key": "k1", "sampling": {"temperature": 1.0},
                         "esamp": {"enabled": False}}]}
    (tmp_path / "run_info.json").write_text(json.dumps(info))
    (tmp_path / "results.jsonl").write_bytes(_line(_problem("m", "p0")) + damage + _line(_problem("m", "p1"))
                                             + _line(_batch("m")))
    return tmp_path


def test_a_torn_multibyte_character_loses_only_its_line(tmp_path: Path) -> None:
    torn = _line(_problem("m", "p7")).replace("é".encode(), "é".encode()[:1])  # the first byte of 2
    folder = _folder(tmp_path, torn)
    assert [r.get("problem_id") for r in read_records(folder / "results.jsonl")] == ["p0", "p1", None]


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_bytes(_line(_problem("m", "p0")) + _line(_problem("m", "p1"))[:-30])
    assert [r["problem_id"] for r in read_records(path)] == ["p0"]
    path.write_bytes(_line(_problem("m", "p0")) + _line(_problem("m", "p1")).split("é".encode())[0] + b"\xc3")
    assert [r["problem_id"] for r in read_records(path)] == ["p0"]


@pytest.mark.parametrize("wrong", WRONG_SHAPES, ids=range(len(WRONG_SHAPES)))
def test_a_line_of_the_wrong_shape_is_skipped_not_a_crash(tmp_path: Path, wrong) -> None:
    folder = _folder(tmp_path, _line(wrong))
    records = read_records(folder / "results.jsonl")
    assert [r.get("problem_id") for r in records] == ["p0", "p1", None]
    assert finished_problems(records) == {("m", "k1", "p0"), ("m", "k1", "p1")}
    report = write_report(folder).read_text()
    assert "| `m` |" in report


def test_skipped_lines_are_counted_with_their_numbers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torn = _line(_problem("m", "p7")).replace("é".encode(), b"\xc3")
    folder = _folder(tmp_path, torn + _line([1, 2]) + b"{\"kind\": \"prob")
    with caplog.at_level(logging.WARNING):
        results = read_results(folder / "results.jsonl")
    assert [b.number for b in results.bad_lines] == [2, 3, 4]
    assert "UTF-8" in results.bad_lines[0].reason and "object" in results.bad_lines[1].reason
    assert "not JSON" in results.bad_lines[2].reason
    assert [r.get("problem_id") for r in results.records] == ["p0", None]  # line 4 swallowed p1's start
    assert "skipped 3 unreadable line(s)" in caplog.text and "line 2:" in caplog.text
    report = write_report(folder).read_text()
    assert "## Skipped lines of results.jsonl" in report
    assert "- line 2: not UTF-8" in report and "- line 3: a JSON list" in report
