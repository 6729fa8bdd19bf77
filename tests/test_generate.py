"""scripts/generate.py end to end: Hydra config -> JSONL + summary, and bad input failing early."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

from esamp_pl.generation import run_generation

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def config(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("override, message", [
    ("esamp.beta=-0.5", "esamp.beta must be a float >= 0"),
    ("sampling.min_p=1.5", "min_p has to be a float in the \\[0, 1\\] interval, but is 1.5"),
    ("sampling.top_p=1.5", "top_p has to be a float in the \\(0, 1\\] interval"),
    ("n=0", "n \\(samples per prompt\\) must be an integer >= 1, but is 0"),
    ("esamp.scope=global", "esamp.scope must be one of"),
    ("esamp.init=pretrained", "esamp.init must be one of"),
    ("+sampling.typical_p=0.9", "unknown key\\(s\\) \\['typical_p'\\] in sampling"),
    ("engine=fast", "engine must be one of \\('eager', 'static'\\)"),
    ("threads=0", "threads must be a positive integer or null"),
    ("esamp.update_mode=later", "esamp.update_mode must be one of"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, override, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=message):
        run_generation(config(override, f"output={out}"))
    assert not out.exists() and not out.with_suffix(".summary.json").exists()


def test_unknown_model_config_is_a_clear_error():
    with pytest.raises(MissingConfigException, match="model"):
        config("model=gpt-17")


@pytest.mark.integration
@pytest.mark.parametrize("prompts, message", [
    ("['hello', '   ']", "empty"),
    ("['" + "word " * 9000 + "']", "max_new_tokens"),
])
def test_bad_prompts_fail_before_writing(tmp_path, prompts, message):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ValueError, match=message):
        run_generation(config(f"prompts={prompts}", f"output={out}", "progress=false"))
    assert not out.exists()


@pytest.mark.integration
def test_generate_on_the_offline_default_model(tmp_path):
    out = tmp_path / "gen.jsonl"
    summary = run_generation(config(f"output={out}", "n=4", "max_new_tokens=12", "progress=false",
                                    "prompts=['Name three colours.','Tell me a joke.']"))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8
    assert {(r["prompt_index"], r["sample_index"]) for r in records} == {(p, j) for p in range(2) for j in range(4)}
    assert all(set(r) == {"prompt_index", "sample_index", "prompt", "text", "num_tokens", "finish_reason",
                          "perplexity"} for r in records)
    assert all(r["perplexity"] > 1 if r["num_tokens"] else r["perplexity"] is None for r in records)
    assert all(r["finish_reason"] in ("stop", "length") and 0 <= r["num_tokens"] <= 12 for r in records)
    saved = json.loads(out.with_suffix(".summary.json").read_text())
    assert saved["distiller_updates"] > 0 and saved["skipped_updates"] == 0
    assert saved["tokens_generated"] == sum(r["num_tokens"] for r in records)
    assert summary["loss_first_step"] > 0 and saved["config"]["esamp"]["beta"] == 0.25


@pytest.mark.integration
def test_engine_key_picks_the_loop_and_both_give_the_same_samples(tmp_path):
    """``engine=static`` (the default) and ``engine=eager`` with synchronous updates: the same tokens."""
    texts, modes = {}, {}
    for engine in ("eager", "static"):
        out = tmp_path / f"{engine}.jsonl"
        summary = run_generation(config(f"output={out}", f"engine={engine}", "esamp.update_mode=sync", "n=2",
                                        "max_new_tokens=10", "progress=false", "threads=1",
                                        "prompts=['Name three colours.','Tell me a joke.']"))
        texts[engine] = [json.loads(line)["text"] for line in out.read_text().splitlines()]
        modes[engine] = summary["engine_mode"]
        assert summary["distiller_updates"] > 0
    assert texts["eager"] == texts["static"] and len(texts["eager"]) == 4
    assert modes["eager"].startswith("eager") and modes["static"].startswith("static")
