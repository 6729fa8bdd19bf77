"""End to end: pre-train on a tiny random model, export, resume, DDP, warm start, and the setup errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from esamp_pl.checkpoint import load_checkpoint
from esamp_pl.distiller import DistillerSpec
from esamp_pl.init import initial_distiller_state
from esamp_pl.models import ModelSpec, ModelUnavailableError, load_model
from esamp_pl.pretrain.corpus import CorpusError
from esamp_pl.pretrain.run import run_pretraining
from tests.pretrain.conftest import CrashAt, FirstStep, pretrain_config

REPO = Path(__file__).resolve().parents[2]
EXPORT = Path("checkpoints") / "tiny" / "paper-r8.distiller.safetensors"


def test_fast_dev_run_exports_a_checkpoint_the_warm_start_accepts(tiny_model_dir, corpus_file, tmp_path, cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "trainer.fast_dev_run=true")
    path = run_pretraining(cfg)
    assert path == tmp_path / EXPORT and path.is_file()
    state, meta = load_checkpoint(path)
    assert meta.model_name == "tiny" and meta.sites == "paper" and meta.hidden_size == 64 and meta.steps == 1
    assert meta.distiller["rank"] == 8 and meta.corpus["source"] == "files" and meta.corpus["pairs"] > 0
    assert {"val/mse", "val/mse_random", "val/top1_agreement", "val/relative_error"} <= meta.metrics.keys()
    loaded = load_model(ModelSpec(name="tiny", name_or_path=str(tiny_model_dir), chat_template=False))
    warm = initial_distiller_state("warm", loaded_model=loaded, sites="paper",
                                   distiller_spec=DistillerSpec(hidden_size=64, rank=8),
                                   checkpoints_dir=tmp_path / "checkpoints")
    assert all(torch.equal(warm[k], state[k]) for k in state)


def test_resume_after_an_interruption(tiny_model_dir, corpus_file, tmp_path, cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(cfg, callbacks=[CrashAt(3)])
    assert not (tmp_path / EXPORT).exists()
    assert list(cache_env.rglob("last.ckpt"))
    first = FirstStep()
    path = run_pretraining(cfg, callbacks=[first])
    assert first.first == 3  # continued, not restarted
    _, meta = load_checkpoint(path)
    assert meta.steps == 6
    assert meta.metrics["val/mse"] < meta.metrics["val/mse_random"]


def test_ddp_two_processes_on_cpu(tiny_model_dir, corpus_file, tmp_path, cache_env):
    cfg_args = ["model.name=tiny", f"model.name_or_path={tiny_model_dir}", "model.gguf_file=null",
                "model.package=null", "model.sha256=null", "model.chat_template=false", "data=files",
                f"data.paths=[{corpus_file}]", "data.window=32", "data.batch_size=32", "distiller.rank=8",
                "trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.devices=2",
                "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
                "warmup_steps=1", f"export.dir={tmp_path / 'checkpoints'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "ESAMP_PL_CACHE": str(cache_env), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain_distiller.py"), *cfg_args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    exported = [line for line in done.stdout.splitlines() if line.startswith("wrote ")]
    assert exported == [f"wrote {tmp_path / EXPORT}"]  # only rank 0 exports
    _, meta = load_checkpoint(tmp_path / EXPORT)
    assert meta.training["devices"] == 2 and meta.steps == 4


def test_corpus_without_text_fails_before_training(tiny_model_dir, tmp_path, cache_env):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n\n")
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{empty}]")
    with pytest.raises(CorpusError, match="no usable text"):
        run_pretraining(cfg)


def test_big_model_on_cpu_is_refused(tiny_model_dir, corpus_file, tmp_path, cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "max_cpu_params=1000")
    with pytest.raises(RuntimeError, match="would take days.*trainer=gpu"):
        run_pretraining(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_trainer_without_gpu_says_what_is_missing(tiny_model_dir, tmp_path, cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, "data.paths=[x.txt]", "trainer=gpu")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*trainer=cpu"):
        run_pretraining(cfg)


def test_llama3_8b_without_weights_says_what_is_missing(tmp_path, cache_env, monkeypatch, corpus_file):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["model=llama3-8b", "data=files",
                                                         f"data.paths=[{corpus_file}]"])
    with pytest.raises(ModelUnavailableError, match="meta-llama/Meta-Llama-3-8B-Instruct.*hf download"):
        run_pretraining(cfg)


# --- items 7 and 11 of issue 10: no overwrite of a checkpoint, interruptions, completed runs, locking ----------

import signal  # noqa: E402

from esamp_pl.errors import ConfigError, Interrupted, SetupError  # noqa: E402
from esamp_pl.files import exclusive_lock  # noqa: E402


def test_default_export_goes_into_the_run_folder_not_the_shipped_checkpoints(tiny_model_dir, corpus_file, tmp_path,
                                                                              cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "trainer.fast_dev_run=true",
                          "export.dir=null")
    path = run_pretraining(cfg)
    assert path.is_relative_to(cache_env / "pretrain") and path.parent.parent.name == "export"
    assert path.name == "paper-r8.distiller.safetensors" and not (REPO / "checkpoints" / "tiny").exists()
    assert not list(cache_env.rglob("last.ckpt"))  # a setup check leaves nothing a real run would resume from


def test_an_existing_export_target_is_only_replaced_when_asked(tiny_model_dir, corpus_file, tmp_path, cache_env):
    target = tmp_path / EXPORT
    target.parent.mkdir(parents=True)
    target.write_bytes(b"precious")
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "trainer.fast_dev_run=true")
    with pytest.raises(ConfigError, match=r"is an existing checkpoint; it is not replaced.*export.overwrite=true"):
        run_pretraining(cfg)
    assert target.read_bytes() == b"precious" and not list(cache_env.rglob("*.ckpt"))
    path = run_pretraining(pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]",
                                           "trainer.fast_dev_run=true", "export.overwrite=true"))
    assert path == target and load_checkpoint(path)[1].steps == 1


def test_a_shipped_checkpoint_is_named_as_such(tmp_path):
    from omegaconf import OmegaConf

    from esamp_pl.checkpoint import default_checkpoints_dir
    from esamp_pl.pretrain.run import export_path
    cfg = OmegaConf.create({"export": {"dir": str(default_checkpoints_dir()), "overwrite": False}})
    with pytest.raises(ConfigError, match="is a checkpoint shipped with esamp_pl"):
        export_path(cfg, tmp_path, "smollm2-135m", "paper", DistillerSpec(hidden_size=576, rank=64))


class SignalAt(Callback):
    def __init__(self, step: int, action) -> None:
        self.step, self.action = step, action

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.action()


def _ctrl_c():
    raise KeyboardInterrupt


@pytest.mark.parametrize("action, signum", [(lambda: os.kill(os.getpid(), signal.SIGTERM), signal.SIGTERM),
                                            (_ctrl_c, signal.SIGINT)], ids=["sigterm", "ctrl-c"])
def test_sigterm_and_ctrl_c_say_how_to_resume_and_keep_last_ckpt(tiny_model_dir, corpus_file, tmp_path, cache_env,
                                                                 action, signum):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]")
    with pytest.raises(Interrupted, match="stopped at step 3.*last.ckpt keeps it; run the same command again to "
                                          "resume") as stopped:
        run_pretraining(cfg, callbacks=[SignalAt(3, action)])
    assert stopped.value.signum == signum and stopped.value.exit_code == 128 + signum
    assert list(cache_env.rglob("last.ckpt")) and not (tmp_path / EXPORT).exists()
    first = FirstStep()
    assert load_checkpoint(run_pretraining(cfg, callbacks=[first]))[1].steps == 6 and first.first == 3


def test_a_completed_run_keeps_last_ckpt_is_not_retrained_and_can_be_continued(tiny_model_dir, corpus_file,
                                                                               tmp_path, cache_env):
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "export.dir=null")
    _, meta = load_checkpoint(run_pretraining(cfg))
    assert meta.steps == 6 and list(cache_env.rglob("last.ckpt"))
    again = FirstStep()
    _, same = load_checkpoint(run_pretraining(cfg, callbacks=[again]))
    assert again.first is None and same.steps == 6 and same.metrics == meta.metrics  # nothing retrained
    longer = FirstStep()
    _, more = load_checkpoint(run_pretraining(
        pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", "export.dir=null",
                        "trainer.max_steps=8"),
        callbacks=[longer]))
    assert longer.first == 6 and more.steps == 8


def test_a_second_run_on_the_same_folder_is_refused(tiny_model_dir, corpus_file, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", f"run_dir={run_dir}")
    with exclusive_lock(run_dir / ".lock", "held by the test"):
        with pytest.raises(SetupError, match=f"the run folder {run_dir} is in use by another run \\(pid {os.getpid()}"):
            run_pretraining(cfg)
    assert not (run_dir / "lightning").exists()


def test_a_torn_last_ckpt_names_its_path_and_resume_false(tiny_model_dir, corpus_file, tmp_path, cache_env):
    run_dir = tmp_path / "run"
    last = run_dir / "lightning" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 torn")
    cfg = pretrain_config(tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", f"run_dir={run_dir}")
    with pytest.raises(ConfigError, match=f"resume checkpoint {last} cannot be read.*resume=false"):
        run_pretraining(cfg)
    assert load_checkpoint(run_pretraining(pretrain_config(
        tiny_model_dir, tmp_path, f"data.paths=[{corpus_file}]", f"run_dir={run_dir}", "resume=false")))[1].steps == 6


def test_unknown_top_level_pretrain_key_is_refused(tiny_model_dir, tmp_path, cache_env):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo'\] at the top level"):
        run_pretraining(pretrain_config(tiny_model_dir, tmp_path, "data.paths=[x.txt]", "+foo=1"))


def test_a_missing_mandatory_value_is_one_clear_error(tmp_path, cache_env):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=["data=files"])
    with pytest.raises(ConfigError, match=r"data.paths is required but not set.*Fix: pass data.paths="):
        run_pretraining(cfg)
