"""The files of one generate run, and the rules that keep them consistent and never clobber a result.

``<output>`` (JSONL, one line per sample) exists only once the run is complete; until then the
samples are appended to ``<output>.partial``, one whole prompt at a time, each prompt flushed to
disk before the next; a write that fails (full disk) is cut back so that no torn line remains.
``<output>.summary.json`` is replaced atomically at the start, after every prompt and at the end:
it carries the run's key (a hash of every setting that shapes the samples, and the prompts), its
``status`` (running, interrupted, complete) and ``interrupted`` (true until complete, so a run
killed with SIGKILL is still marked as such).

:meth:`RunOutput.plan` decides, before the model loads, what a new run does with the files found:
resume (same key, unfinished: the finished prompts are kept), nothing (same key, complete), or
refuse (other settings, or files esamp_pl did not write) unless ``overwrite=true``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from esamp_pl.errors import ConfigError, SetupError
from esamp_pl.files import dumps_json, fsync_dir, write_json_atomic, write_lines_atomic

log = logging.getLogger(__name__)
COSMETIC_KEYS = ("output", "progress", "threads", "overwrite", "cuda_graphs", "prompts")
"top-level keys that do not change the samples (prompts enter the key by content, not by path)"


class OutputWriteError(SetupError):
    """The output could not be written (e.g. a full disk); what was written before stays valid."""


def run_key(config: dict[str, Any], prompts: list[str]) -> str:
    """Hash of every setting that shapes the samples, and of the prompts' text."""
    identity = {k: v for k, v in config.items() if k not in COSMETIC_KEYS}
    blob = json.dumps({"config": identity, "prompts": prompts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _differences(old: dict[str, Any], new: dict[str, Any], limit: int = 4) -> str:
    old_flat, new_flat = (_flatten({k: v for k, v in c.items() if k not in COSMETIC_KEYS}) for c in (old, new))
    keys = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
    if not keys:
        return "the prompts differ"
    shown = ", ".join(f"{k}: {old_flat.get(k)!r} -> {new_flat.get(k)!r}" for k in keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class Plan:
    """What the new run does with the files it found."""

    done: dict[int, list[str]] = field(default_factory=dict)
    "prompt index -> its JSONL lines, kept from an unfinished run with the same key"
    complete: bool = False
    "the output already holds this very run, complete"
    summary: dict[str, Any] | None = None
    fresh: bool = False
    "overwrite=true: the earlier run's files are removed when this run starts"


class RunOutput:
    """The output, partial and summary files of a run with ``config`` over ``prompts``."""

    def __init__(self, path: Path, *, n: int, prompts: list[str], config: dict[str, Any]) -> None:
        self.path = path
        self.partial = path.with_name(path.name + ".partial")
        self.summary_path = path.with_suffix(".summary.json")
        self.n, self.prompts, self.config = n, prompts, config
        self.key = run_key(config, prompts)

    @property
    def files(self) -> tuple[Path, Path, Path]:
        return self.path, self.partial, self.summary_path

    def read_summary(self) -> dict[str, Any] | None:
        try:
            summary = json.loads(self.summary_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) else None

    def check_writable(self) -> None:
        """Create the folder and write (and remove) a probe file there: fail now, not after the model loads."""
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".probe", dir=folder)
            try:
                os.write(fd, b"probe\n")
                os.fsync(fd)
            finally:
                os.close(fd)
                Path(probe).unlink(missing_ok=True)
        except OSError as err:
            raise ConfigError(f"output={str(self.path)!r}: cannot write in {folder} ({err.strerror or err}). "
                              "Fix: free space, or choose a writable output= path") from err

    def plan(self, *, overwrite: bool, protected: Path | None = None) -> Plan:
        """Decide resume / nothing to do / refuse (see the module docstring); checks writability too."""
        if protected is not None:
            target = protected.resolve()
            if any(target == f.resolve() for f in self.files):
                raise ConfigError(f"prompts={str(protected)!r} is also an output file of this run ({self.path}); "
                                  "the samples would overwrite the prompts. Fix: choose another output= path")
        for path in self.files:
            if path.is_dir():
                raise ConfigError(f"output={str(self.path)!r}: {path} is a directory. Fix: choose another output=")
        self.check_writable()
        if overwrite:
            return Plan(fresh=True)
        summary = self.read_summary()
        same = summary is not None and summary.get("run_key") == self.key
        fix = "choose another output= path, or pass overwrite=true to replace it"
        if self.path.exists():
            if same and (summary.get("status") == "complete" or not self.partial.exists()):
                return Plan(complete=True, summary={**summary, "status": "complete", "interrupted": False})
            if summary is None:
                raise ConfigError(f"output={str(self.path)!r} exists and has no esamp_pl summary beside it "
                                  f"({self.summary_path.name}); it is not replaced. Fix: {fix}")
            raise ConfigError(f"output={str(self.path)!r} holds a complete run with other settings "
                              f"({_differences(summary.get('config', {}), self.config)}). Fix: {fix}")
        if self.partial.exists():
            if same:
                return Plan(done=self._finished_prompts(), summary=summary)
            what = ("with other settings (" + _differences(summary.get("config", {}), self.config) + ")"
                    if summary is not None else "without a summary")
            raise ConfigError(f"{self.partial} holds an unfinished run {what}; rerun with its settings to resume "
                              f"it. Fix: {fix}")
        return Plan()

    def _finished_prompts(self) -> dict[int, list[str]]:
        """Lines of the prompts whose n samples are all in the partial file; torn or stray lines are dropped."""
        groups: dict[int, dict[int, str]] = {}
        raw = self.partial.read_bytes()
        for chunk in raw.split(b"\n")[:-1]:  # the last piece has no newline: torn (or empty)
            try:
                line = chunk.decode("utf-8")
                record = json.loads(line)
                index, sample = record["prompt_index"], record["sample_index"]
            except (UnicodeDecodeError, ValueError, TypeError, KeyError):
                continue
            if (isinstance(index, int) and isinstance(sample, int) and 0 <= index < len(self.prompts)
                    and 0 <= sample < self.n and record.get("prompt") == self.prompts[index]):
                groups.setdefault(index, {})[sample] = line
        return {i: [g[j] for j in range(self.n)] for i, g in sorted(groups.items()) if len(g) == self.n}

    def start(self, plan: Plan, summary: dict[str, Any]) -> "RunWriter":
        """Set the files up for this run (kept prompts rewritten whole) and open the partial file."""
        if plan.fresh:
            for path in self.files:
                path.unlink(missing_ok=True)
        write_lines_atomic(self.partial, [line for lines in plan.done.values() for line in lines])
        writer = RunWriter(self, set(plan.done))
        writer.write_summary(summary, "running")
        return writer


class RunWriter:
    """Appends whole prompts to the partial file and keeps the summary in step."""

    def __init__(self, output: RunOutput, done: set[int]) -> None:
        self.output = output
        self.done = done
        self.summary: dict[str, Any] = {}
        self._sink: BinaryIO | None = open(output.partial, "ab")

    @property
    def done_count(self) -> int:
        return len(self.done)

    def write_summary(self, summary: dict[str, Any], status: str) -> None:
        self.summary = {**summary, "run_key": self.output.key, "status": status,
                        "interrupted": status != "complete", "prompts_total": len(self.output.prompts),
                        "prompts_done": len(self.done)}
        write_json_atomic(self.output.summary_path, self.summary)

    def write_prompt(self, index: int, records: list[dict[str, Any]], summary: dict[str, Any]) -> None:
        """Append one prompt's lines and fsync them; on failure cut the file back to the last whole prompt."""
        assert self._sink is not None
        data = "".join(dumps_json(record) + "\n" for record in records).encode("utf-8")
        start = self._sink.tell()
        try:
            self._sink.write(data)
            self._sink.flush()
            os.fsync(self._sink.fileno())
        except OSError as err:
            self._cut_back(start)
            raise OutputWriteError(
                f"could not write the {len(records)} samples of prompt {index} to {self.output.partial} "
                f"({err.strerror or err}); those samples are lost, the {len(self.done)} prompt(s) written before "
                "are intact. Fix: free disk space and run the same command again to resume") from err
        self.done.add(index)
        try:
            self.write_summary(summary, "running")
        except OSError as err:
            raise OutputWriteError(f"could not update {self.output.summary_path} ({err.strerror or err}); the "
                                   f"samples in {self.output.partial} are intact. Fix: free disk space and run the "
                                   "same command again to resume") from err

    def _cut_back(self, size: int) -> None:
        try:
            self._sink.truncate(size)
            self._sink.flush()
            os.fsync(self._sink.fileno())
        except OSError:  # the reader drops a torn last line anyway
            log.warning("could not cut %s back to %d bytes", self.output.partial, size)

    def _close(self) -> None:
        if self._sink is not None:
            try:
                self._sink.close()
            except OSError:
                pass
            self._sink = None

    def stop(self, summary: dict[str, Any]) -> None:
        """An interruption or error: close and mark the summary interrupted (best effort on a full disk)."""
        self._close()
        try:
            self.write_summary(summary, "interrupted")
        except OSError as err:
            log.warning("could not update %s (%s); it still says the run is unfinished",
                        self.output.summary_path, err)

    def finish(self, summary: dict[str, Any]) -> None:
        """Every prompt done: move the partial file onto the output, then mark the summary complete."""
        self._close()
        os.replace(self.output.partial, self.output.path)
        fsync_dir(self.output.path.parent)
        self.write_summary(summary, "complete")
