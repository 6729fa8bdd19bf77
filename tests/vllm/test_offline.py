"""``generate.py engine=vllm`` / ``benchmark.py engine=vllm`` on the project's real configs (hydra compose)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("vllm.sampling_params")  # the real vLLM, not this folder as a namespace package

from hydra import compose, initialize_config_dir  # noqa: E402

from esamp_pl import vllm as esamp_vllm  # noqa: E402

pytestmark = pytest.mark.vllm

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def test_generate_with_vllm_writes_the_own_engines_outputs(llm, tmp_path):
    output = tmp_path / "gen.jsonl"
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["engine=vllm", "n=3", "max_new_tokens=8", f"output={output}",
                                           "progress=false", "prompts=['Say hello.','Name a fruit.']"])
    summary = esamp_vllm.generate_with_vllm(cfg, llm)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [(r["prompt_index"], r["sample_index"]) for r in records] == [(p, j) for p in range(2) for j in range(3)]
    assert all(0 < r["num_tokens"] <= 8 and r["finish_reason"] in ("stop", "length") for r in records)
    assert all(r["perplexity"] is None or r["perplexity"] >= 1.0 for r in records)
    assert json.loads(output.with_suffix(".summary.json").read_text()) == summary
    assert summary["engine_mode"].startswith("vllm ") and summary["tokens_generated"] > 0
    assert summary["distiller_updates"] > 0 and len(summary["loss_per_step"]) <= 7
    assert summary["loss_first_step"] == summary["loss_per_step"][0]


def test_vllm_rejects_settings_it_cannot_honour(llm, tmp_path):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=["engine=vllm", "esamp.mode=sharpen_only", f"output={tmp_path / 'x.jsonl'}"])
    with pytest.raises(ValueError, match="sharpen_only"):
        esamp_vllm.generate_with_vllm(cfg, llm)
    assert not (tmp_path / "x.jsonl").exists()


def test_benchmark_measures_on_and_off_with_updates(llm):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("benchmark", overrides=["num_prompts=2", "n=2", "max_new_tokens=6", "rounds=1", "warmup=0"])
    summary = esamp_vllm.benchmark(cfg, llm)
    assert summary["updates"] == 2 * 5  # two prompts' groups, one update per decode step each
    assert summary["own_updates"] == 2 * 5 and summary["own_tokens_per_s_off"] > 0  # the own engine, same run
    assert summary["tokens_per_s_on"] > 0 and summary["tokens_per_s_off"] > 0
    assert summary["esamp_on_off_ratio"] == pytest.approx(summary["tokens_per_s_on"] / summary["tokens_per_s_off"],
                                                          rel=1e-2)
