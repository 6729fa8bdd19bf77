"""Answer extraction on the tricky shapes models actually produce."""

from __future__ import annotations

import pytest

from esamp_pl.evaluation.answers import (
    extract_boxed,
    extract_choice_letter,
    extract_code,
    extract_final_number,
    extract_integer,
    numbers_equal,
    parse_number,
)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("So she makes 9 * 2 = $18 every day.\n#### 18", 18),
        ("The answer is \\boxed{1,234}.", 1234),
        ("Total: \\boxed{\\$1,234,567.50}", 1234567.5),
        ("The answer is $18.00.", 18),
        ("She runs 5 km a day, so the answer is 35 km.", 35),
        ("The temperature drops to \\boxed{-7} degrees.", -7),
        ("The change is −12 dollars", -12),  # unicode minus
        ("We get 10-3 = 7 apples left.", 7),  # subtraction, not a negative
        ("First 3 then 4, finally \\boxed{12} and later 99 words.", 12),  # boxed beats last number
        ("\\boxed{3} is wrong; corrected: \\boxed{5}", 5),  # the last box wins
        ("\\boxed{\\frac{1}{2}}", 0.5),
        ("\\boxed{18 \\text{ dollars}}", 18),
        ("\\boxed{1{,}000}", 1000),
        ("The price is 50% of 40, i.e. 20", 20),
        ("So the final answer is: 0.75 hours", 0.75),
        ("#### 1,000\n", 1000),
        ("The list is 2, 3, and 4", 4),  # comma-separated list, not 2,3
        ("Answer: .5", 0.5),
        ("x = -4", -4),
        ("\\boxed{\\text{none}} but the count is 6", 6),  # empty box falls through
        ("I do not know.", None),
    ],
)
def test_extract_final_number(text: str, expected: float | None) -> None:
    got = extract_final_number(text)
    if expected is None:
        assert got is None
    else:
        assert got is not None and numbers_equal(got, expected), got


def test_boxed_nested_and_unbalanced() -> None:
    assert extract_boxed("x \\boxed{\\frac{a}{b}} y") == "\\frac{a}{b}"
    assert extract_boxed("no box") is None
    assert extract_boxed("\\boxed{12") is None  # cut off mid-box


def test_parse_number_units_and_commas() -> None:
    assert parse_number("336^\\circ") == 336
    assert parse_number("$1,250 per month") == 1250
    assert parse_number("3/4") == 0.75
    assert parse_number("abc") is None


def test_numbers_equal() -> None:
    assert numbers_equal(18.0, 18)
    assert numbers_equal(18.0000000001, 18)
    assert not numbers_equal(18.5, 18)
    assert not numbers_equal(None, 18)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Thus m+n = \\boxed{070}", 70),
        ("The area is \\boxed{588}.", 588),
        ("so the answer is 336^\\circ", 336),
        ("\\boxed{2.5}", None),  # not an integer
        ("nothing", None),
    ],
)
def test_extract_integer(text: str, expected: int | None) -> None:
    assert extract_integer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Reasoning...\nAnswer: C", "C"),
        ("The correct option is (B), since ...", "B"),
        ("so the final answer is \\boxed{D}", "D"),
        ("\\boxed{\\text{A}}", "A"),
        ("\\boxed{(B)}", "B"),
        ("The answer is **C**.", "C"),
        ("The answer is option D", "D"),
        ("(A) looks tempting but the answer is (C).", "C"),
        ("A careful look shows it.\n\nB", "B"),
        ("A reaction occurs and a product forms.", None),  # "A" as an English word
        ("The answer is a bit subtle.", None),  # lower-case "a" is prose
        ("Answer: E", None),  # not an option
    ],
)
def test_extract_choice_letter(text: str, expected: str | None) -> None:
    assert extract_choice_letter(text) == expected


def test_extract_code_fenced_full_function() -> None:
    completion = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    code, full = extract_code(completion, "add")
    assert full and code == "def add(a, b):\n    return a + b\n"


def test_extract_code_prefers_block_defining_entry_point() -> None:
    completion = "```python\nimport math\n```\n\n```python\ndef f(x):\n    return math.sqrt(x)\n```"
    code, full = extract_code(completion, "f")
    assert full and code.startswith("def f(x):")


def test_extract_code_body_continuation_and_driver_code() -> None:
    code, full = extract_code("    return a + b\n\nprint(add(1, 2))\n", "add")
    assert not full and code == "    return a + b\n"


def test_extract_code_flush_left_body_in_fence_is_indented() -> None:
    code, full = extract_code("```python\nresult = a + b\nif result:\n    return result\nreturn 0\n```", "add")
    assert not full
    assert code == "    result = a + b\n    if result:\n        return result\n    return 0\n"


def test_extract_code_unfenced_full_function_with_prose() -> None:
    completion = "Here is my solution:\ndef add(a, b):\n    return a + b\nThis adds the two numbers."
    code, full = extract_code(completion, "add", prompt="def add(a, b):\n    '''Add.'''\n")
    assert full and code == "def add(a, b):\n    return a + b\n"


def test_extract_code_body_with_trailing_prose() -> None:
    prompt = "def add(a, b):\n    '''Add.'''\n"
    code, full = extract_code("    return a + b\n\nThe function returns the sum.", "add", prompt=prompt)
    assert not full and code == "    return a + b\n"
