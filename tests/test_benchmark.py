import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from esamp_pl.benchmark import run_benchmark
from tests.pretrain.conftest import write_tiny_model

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(model_dir: Path, *overrides: str):
    tiny = [f"model.name=tiny", f"model.name_or_path={model_dir}", "model.gguf_file=null", "model.package=null",
            "model.sha256=null", "model.chat_template=false"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="benchmark", overrides=[*tiny, "max_new_tokens=4", "num_prompts=2", "n=2",
                                                           "rounds=2", "hf_rounds=1", *overrides])


def test_benchmark_alternates_the_modes_and_reports_the_ratios(tmp_path, capsys):
    cfg = config(write_tiny_model(tmp_path / "tiny"))
    summary = run_benchmark(cfg)
    assert {len(summary["rates"][m]) for m in ("off", "on")} == {2} and len(summary["rates"]["hf"]) == 1
    assert summary["updates"] == 2 * 3  # 2 prompts' Distillers x 3 decode steps: the update really runs
    for key in ("esamp_on_off_ratio", "engine_hf_ratio", "tokens_per_s_on", "tokens_per_s_off"):
        assert summary[key] > 0
    assert summary["device"] == "cpu" and summary["paths"]["on"] == "static, eager, async update"
    assert set(summary["extras_ms_per_step"]) == {"distiller_forward", "projection_fusion", "update", "clip_adam",
                                                  "loss_backward"}
    assert "ESamp on / off" in capsys.readouterr().out
    json.dumps(summary)


def test_bad_benchmark_settings_fail_before_the_model_loads(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match="engine must be one of"):
        run_benchmark(config(missing, "engine=fast"))
    with pytest.raises(ValueError, match="hf_rounds must be in \\[1, rounds=2\\], but is 3"):
        run_benchmark(config(missing, "hf_rounds=3"))
    with pytest.raises(ValueError, match="num_prompts must be in \\[1, 8\\]"):
        run_benchmark(config(missing, "num_prompts=9"))


def test_gpu_preset_is_the_papers_setting():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose(config_name="benchmark_gpu")
    assert (cfg.model.name, cfg.device, cfg.num_prompts, cfg.n) == ("qwen2.5-7b", "cuda", 8, 16)
    assert cfg.esamp.beta == 0.25 and cfg.esamp.update_mode == "async" and cfg.esamp.scope == "per_prompt"
