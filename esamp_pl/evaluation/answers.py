"""Answer extraction: turn a free-form completion into something a grader can compare.

Models answer in many shapes (``\\boxed{1,234}``, ``#### 18``, ``The answer is $18.00.``,
``Answer: (C)``), so extraction tries the most explicit marker first and falls back to weaker
cues. Numbers are compared numerically (``18``, ``18.0`` and ``$18.00`` are equal), never as
strings. Every extractor returns ``None`` when it finds nothing, which graders count as wrong.
"""

from __future__ import annotations

import ast
import math
import re

__all__ = [
    "extract_boxed",
    "parse_number",
    "extract_final_number",
    "extract_integer",
    "extract_choice_letter",
    "numbers_equal",
    "extract_code",
]

# A number after clean-up: thousands-grouped ("1,234,567.5"), plain ("42", "3.14") or leading-dot
# (".5"). The sign is only a minus when it does not follow a word character or a closing bracket,
# so "10-3" yields 10 and 3 rather than 10 and -3.
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?![\d])"
)
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*(-?[\d.]+)\s*\}")
_SLASH_FRAC = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), with nested braces matched.

    The last box wins because models often box intermediate results before the final one.
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        return None
    start = starts[-1]
    depth = 1
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
    return None  # unbalanced: the completion was cut off inside the box


def _clean(text: str) -> str:
    """Remove currency signs, LaTeX spacing/grouping and unicode minus so numbers parse."""
    text = text.replace("\u2212", "-").replace("\u2013", "-")  # unicode minus / en dash
    text = text.replace("\\$", " ").replace("$", " ")
    text = text.replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = re.sub(r"\\(?:text|mathrm|textbf|mathbf)\s*\{([^{}]*)\}", r" \1 ", text)
    return text


def _to_float(token: str) -> float:
    return float(token.replace(",", ""))


def parse_number(text: str) -> float | None:
    """First number in ``text`` after clean-up, as a float; ``None`` if there is none.

    Handles commas as thousands separators, ``$`` and trailing units ("18 dollars", "5 cm",
    "50%"), negatives, decimals, ``\\frac{a}{b}`` and a bare ``a/b``.
    """
    cleaned = _clean(text)
    frac = _FRAC.search(cleaned)
    slash = _SLASH_FRAC.match(cleaned)
    first = _NUMBER.search(cleaned)
    if frac and (first is None or frac.start() <= first.start()):
        num, den = float(frac.group(1)), float(frac.group(2))
        return num / den if den != 0 else None
    if slash:
        num, den = float(slash.group(1)), float(slash.group(2))
        return num / den if den != 0 else None
    if first is None:
        return None
    return _to_float(first.group(0))


def _last_number(text: str) -> float | None:
    matches = _NUMBER.findall(_clean(text))
    return _to_float(matches[-1]) if matches else None


_ANSWER_IS = re.compile(
    r"answer\s*(?:is\s*:?|:|=)\s*(.{0,80})", re.IGNORECASE | re.DOTALL
)


def extract_final_number(text: str) -> float | None:
    """The final numeric answer of a math completion (GSM8K style).

    Order of preference: last ``\\boxed{}``, text after the last ``####``, text after the last
    "answer is"/"answer:", then the last number anywhere. Each step falls through to the next
    when it yields no number.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        value = parse_number(boxed)
        if value is not None:
            return value
    if "####" in text:
        value = parse_number(text.rsplit("####", 1)[1])
        if value is not None:
            return value
    answers = list(_ANSWER_IS.finditer(text))
    if answers:
        value = parse_number(answers[-1].group(1))
        if value is not None:
            return value
    return _last_number(text)


def extract_integer(text: str) -> int | None:
    """An integer final answer (AIME): the final number, kept only when it is integral."""
    value = extract_final_number(text)
    if value is None or not math.isfinite(value) or not float(value).is_integer():
        return None
    return int(value)


def numbers_equal(a: float | None, b: float | None, rel_tol: float = 1e-6) -> bool:
    """Numeric equality with a small tolerance, so ``18`` equals ``18.000000001``."""
    if a is None or b is None:
        return False
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol)


def extract_choice_letter(text: str, letters: str = "ABCD") -> str | None:
    """The chosen option letter of a multiple-choice completion (GPQA).

    Order: last ``\\boxed{X}`` (also ``\\boxed{\\text{X}}``, ``\\boxed{(X)}``); last
    "answer is X" / "Answer: (X)" / "answer: **X**"; last parenthesised ``(X)``; a final line that
    is only the letter. A bare "A" inside prose is never taken, because it is an English word.
    """
    cls = f"[{re.escape(letters)}]"
    boxed = extract_boxed(text)
    if boxed is not None:
        m = re.fullmatch(rf"[\s(*]*(?:\\text(?:bf)?\s*\{{\s*)?\(?({cls})\)?\s*\}}?[\s).*]*", boxed)
        if m:
            return m.group(1)
    # Only the keywords are case-insensitive: a lower-case "a" after "answer is" is prose.
    answer = list(
        re.finditer(
            rf"(?i:answer)[*_]*\s*(?:(?i:is|would\s+be|should\s+be)\s*:?|:|=)\s*[*_]*\s*"
            rf"(?:(?i:option|choice)\s*)?[*_]*\(?({cls})\)?(?![\w])",
            text,
        )
    )
    if answer:
        return answer[-1].group(1)
    paren = re.findall(rf"\(({cls})\)", text)
    if paren:
        return paren[-1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        m = re.fullmatch(rf"[*_]*\(?({cls})\)?[*_.]*", lines[-1])
        if m:
            return m.group(1)
    return None


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)
# Top-level lines that begin test/driver code a model may append after the function body; they
# are cut so stray prints or asserts do not decide the outcome.
_BODY_STOP = re.compile(r"^(?:if\s+__name__|print\(|assert\s|#\s*(?:test|example))", re.MULTILINE)


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return True


def _trim_trailing(prefix: str, code: str) -> str:
    """Longest leading run of ``code``'s lines that parses after ``prefix`` (all of it if none).

    Models often add prose or a half-written line after the code; cutting it keeps what they
    wrote as code, the same effect as the stop sequences of the Codex evaluation.
    """
    if _parses(prefix + code):
        return code
    lines = code.split("\n")
    for end in range(len(lines) - 1, 0, -1):
        candidate = "\n".join(lines[:end]).rstrip() + "\n"
        if candidate.strip() and _parses(prefix + candidate):
            return candidate
    return code


_TOP_LEVEL_CODE = re.compile(r"^(?:def |class |import |from |@)", re.MULTILINE)


def extract_code(completion: str, entry_point: str, prompt: str = "") -> tuple[str, bool]:
    """Code to run after a HumanEval prompt, and whether it is a full function definition.

    A completion may be a full function (often inside a ```python fence) or just the body that
    continues the prompt. Returns ``(code, is_full)``: with ``is_full`` the code defines
    ``entry_point`` itself and is appended after the prompt (whose docstring-only function it
    redefines, keeping the prompt's imports and helpers); otherwise it is the body, indented if
    the model started it flush-left, and cut at top-level driver code. Prose before an unfenced
    function and unparsable trailing lines (checked against ``prompt``) are dropped.
    """
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(completion)]
    code = completion
    if blocks:
        defining = [b for lang, b in blocks if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", b, re.M)]
        python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
        code = (defining or python or [blocks[0][1]])[0]
    if re.search(rf"^def\s+{re.escape(entry_point)}\s*\(", code, re.MULTILINE):
        first = _TOP_LEVEL_CODE.search(code)
        code = code[first.start() :] if first else code
        code = code.strip("\n") + "\n"
        return _trim_trailing(prompt + "\n", code), True
    if blocks:
        code = code.strip("\n")
    stop = _BODY_STOP.search(code)
    if stop:
        code = code[: stop.start()]
    lines = code.split("\n")
    non_empty = [ln for ln in lines if ln.strip()]
    if non_empty and not non_empty[0].startswith((" ", "\t")):
        code = "\n".join(("    " + ln) if ln.strip() else ln for ln in lines)
    code = code.rstrip() + "\n"
    return (_trim_trailing(prompt, code) if prompt else code), False
