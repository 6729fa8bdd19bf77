"""The shipped configs compose, validate and build what they promise."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from esamp_pl.pretrain.corpus import DataSpec, read_documents

CONF = Path(__file__).resolve().parents[2] / "conf"


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def test_defaults_are_the_offline_cpu_setup():
    cfg = composed()
    assert cfg.model.name == "smollm2-135m" and cfg.data.source == "self_generated"
    assert cfg.trainer.accelerator == "cpu" and cfg.distiller.rank == 64
    assert DataSpec.from_config(cfg.data).num_prompts > 0
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    assert trainer.max_steps == cfg.trainer.max_steps


@pytest.mark.parametrize("name, strategy, precision", [("gpu", None, "bf16-mixed"), ("ddp", "ddp", "bf16-mixed"),
                                                       ("fsdp", "fsdp", "bf16-mixed")])
def test_gpu_trainers(name, strategy, precision):
    cfg = composed(f"trainer={name}")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == precision
    assert cfg.trainer.get("strategy") == strategy


def test_hub_config_reads_a_local_dataset_folder(tmp_path, cache_env):
    (tmp_path / "ds").mkdir()
    (tmp_path / "ds" / "train.jsonl").write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}))
    cfg = composed("data=hub", f"data.dataset={tmp_path / 'ds'}")
    assert read_documents(DataSpec.from_config(cfg.data)) == ["one", "two"]


def test_files_config_needs_paths():
    from esamp_pl.errors import ConfigError
    with pytest.raises(ConfigError, match="paths is required but not set.*Fix: pass"):
        DataSpec.from_config(composed("data=files").data)
