"""Task loaders read the packaged benchmarks offline; graders accept the references."""

from __future__ import annotations

import json
import importlib.resources

import pytest

from esamp_pl.evaluation.tasks import GRADED_TASKS, TASKS, Problem, gpqa_shuffle, grade, grade_many, is_graded, load_task
from tests.evaluation.conftest import usable_sandbox


@pytest.mark.parametrize(
    "name, rows", [("gsm8k", 1319), ("aime2025", 30), ("gpqa", 198), ("humaneval", 164)]
)
def test_row_counts(name: str, rows: int) -> None:
    problems = load_task(name)
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows  # ids are unique
    assert all(isinstance(p, Problem) and p.task == name and p.prompt for p in problems)


def test_creative_prompts() -> None:
    problems = load_task("creative")
    assert len(problems) >= 32
    assert len({p.id for p in problems}) == len(problems)
    assert len({p.prompt for p in problems}) == len(problems)
    assert not is_graded("creative")
    with pytest.raises(ValueError):
        grade(problems[0], "Once upon a time")
    raw = importlib.resources.files("esamp_pl.evaluation").joinpath("data", "creative_prompts.jsonl")
    for line in raw.read_text().splitlines():
        assert set(json.loads(line)) == {"id", "prompt"}


def test_limit_and_unknown() -> None:
    assert [p.id for p in load_task("gsm8k", limit=3)] == ["gsm8k/0", "gsm8k/1", "gsm8k/2"]
    with pytest.raises(ValueError):
        load_task("mmlu")
    assert set(GRADED_TASKS) < set(TASKS)


def test_math_prompts_ask_for_boxed() -> None:
    for name in ("gsm8k", "aime2025"):
        assert "\\boxed{}" in load_task(name, limit=1)[0].prompt


def test_gsm8k_reference_solutions_grade_correct() -> None:
    problems = load_task("gsm8k")
    assert all(grade(p, p.reference["solution"]) for p in problems)
    p = problems[0]  # Janet's ducks: 18
    assert grade(p, "She makes \\boxed{\\$18.00} per day.")
    assert not grade(p, "The answer is 17.")


def test_aime_answers_are_integers_and_grade() -> None:
    problems = load_task("aime2025")
    assert all(0 <= int(p.reference["answer"]) <= 999 for p in problems)
    p = next(p for p in problems if p.reference["answer"] == "336")  # stored as "336^\circ"
    assert grade(p, "The angle is \\boxed{336}")
    assert not grade(p, "The angle is \\boxed{335}")


def test_gpqa_shuffle_is_deterministic_and_consistent() -> None:
    a = load_task("gpqa", limit=20, seed=0)
    b = load_task("gpqa", limit=20, seed=0)
    assert [p.prompt for p in a] == [p.prompt for p in b]
    assert [p.reference["answer"] for p in a] == [p.reference["answer"] for p in b]
    for p in a:
        letter = p.reference["answer"]
        choices = p.reference["choices"]
        correct = choices["ABCD".index(letter)]
        assert f"{letter}) {correct}" in p.prompt  # the prompt shows the correct text under its letter
        assert grade(p, f"Reasoning.\n\\boxed{{{letter}}}")
        wrong = next(x for x in "ABCD" if x != letter)
        assert not grade(p, f"Answer: {wrong}")
    # The permutation depends on (seed, record id) only: same for a subset, differs across seeds.
    choices, letter = gpqa_shuffle("rec-x", "right", ["w1", "w2", "w3"], seed=0)
    assert choices["ABCD".index(letter)] == "right" and sorted(choices) == ["right", "w1", "w2", "w3"]
    assert gpqa_shuffle("rec-x", "right", ["w1", "w2", "w3"], seed=0) == (choices, letter)
    full = load_task("gpqa", seed=0)
    assert [p.prompt for p in full[:20]] == [p.prompt for p in a]
    other = load_task("gpqa", seed=1)
    assert [p.prompt for p in other] != [p.prompt for p in full]
    letters = {p.reference["answer"] for p in full}
    assert letters == set("ABCD")  # the correct answer is not always in one place


def test_humaneval_grade_many() -> None:
    p = load_task("humaneval", limit=1)[0]
    assert p.reference["entry_point"] in p.prompt
    assert grade_many(p, [p.reference["canonical_solution"], "    return None\n"],
                      sandbox=usable_sandbox()) == [True, False]


def test_creative_takes_the_users_prompts(tmp_path) -> None:
    txt = tmp_path / "mine.txt"
    txt.write_text("A story about a red door.\n\nA poem about rain.\n", encoding="utf-8")
    problems = load_task("creative", prompts=str(txt))
    assert [p.prompt for p in problems] == ["A story about a red door.", "A poem about rain."]
    assert all(p.task == "creative" and p.id.startswith("creative/user-") for p in problems)
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text('{"prompt": "A poem about rain."}\n{"prompt": "Line one\\nline two"}\n', encoding="utf-8")
    again = load_task("creative", prompts=str(jsonl), limit=1)
    assert [p.prompt for p in again] == ["A poem about rain."]
    assert again[0].id != problems[1].id  # another position: another problem, even with the same text
    edited = load_task("creative", prompts=["A story about a red door.", "A poem about snow."])
    assert edited[0].id == problems[0].id and edited[1].id != problems[1].id  # unchanged prompts keep their id
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        load_task("creative", prompts=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="eval.prompts=.* is only for eval=creative"):
        load_task("gsm8k", prompts=str(txt))
