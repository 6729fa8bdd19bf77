"""esamp_pl.generate and the README's Python examples: on a tiny model, and (integration) on the bundled one."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

import esamp_pl
from esamp_pl import api
from esamp_pl.checkpoint import CheckpointMeta, CheckpointNotFoundError, checkpoint_filename, save_checkpoint
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeSettings
from esamp_pl.init import svd_state
from esamp_pl.models import model_fingerprint
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import make_engine
from tests.conftest import tiny_model
from tests.pretrain.conftest import byte_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPTS = ["The river bends twice.", "A kite needs wind"]


def readme_python_blocks() -> list[str]:
    """The ```python blocks of the README's "In Python" section, in order."""
    section = README.read_text().split("\n## In Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def tiny_pair():
    model = tiny_model("llama", vocab_size=260)
    tokenizer = byte_tokenizer()
    tokenizer.padding_side = "left"
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@pytest.fixture
def user_checkpoints(tmp_path, monkeypatch) -> Path:
    """The user's checkpoint folder (and every esamp_pl cache) under the test's temp folder."""
    monkeypatch.setenv("ESAMP_PL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"


def save_for(model, folder: Path, state: dict, rank: int = 64) -> Path:
    """A checkpoint made for ``model`` (its fingerprint), under a name that is no conf/model entry."""
    spec = DistillerSpec(hidden_size=model.config.hidden_size, rank=rank)
    meta = CheckpointMeta(model_name="my-notebook-model", model_id="in memory",
                          model_fingerprint=model_fingerprint(model.config), sites="paper",
                          distiller=dataclasses.asdict(spec))
    return save_checkpoint(folder / "my-notebook-model" / checkpoint_filename("paper", spec), state, meta)


def test_the_readme_shows_the_python_api_right_after_the_set_up():
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.M)
    assert headings[:2] == ["Set-up: two commands", "In Python"]


def test_readme_examples_run_on_a_tiny_model(monkeypatch, user_checkpoints):
    model, tokenizer = tiny_pair()
    checkpoint = save_for(model, user_checkpoints, svd_state(model, DistillerSpec(hidden_size=64, rank=64)))
    monkeypatch.setattr(api, "load_model", lambda *args, **kwargs: (model, tokenizer))
    blocks = readme_python_blocks()
    assert len(blocks) == 2 and "esamp_pl.generate(" in blocks[0] and "custom_generate=" in blocks[1]
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    out = namespace["out"]
    assert len(out.texts) == 1 and len(out.texts[0]) == 8 and len(out.token_ids[0]) == 8
    assert out.stats.init == "warm" and out.stats.warm_start_path == str(checkpoint)
    assert out.stats.updates > 0 and out.stats.skipped_updates == 0
    assert all(reason in ("stop", "length") for reason in out.finish_reasons[0])
    prompt_width = namespace["inputs"]["input_ids"].shape[1]
    sequences = namespace["sequences"]
    assert sequences.shape[0] == 8 and prompt_width < sequences.shape[1] <= prompt_width + 64


def test_generate_gives_the_engines_tokens_and_beta_zero_gives_plain_sampling():
    model, tokenizer = tiny_pair()
    common = dict(n=3, max_new_tokens=10, seed=2, chat_template=False, min_p=0.0, max_candidates=260)
    plain = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=None, **common)
    zero = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(beta=0.0), **common)
    on = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(beta=0.5), **common)
    assert zero.token_ids == plain.token_ids and zero.stats.updates > 0 and plain.stats.updates == 0
    assert on.token_ids != plain.token_ids
    # The reference: the engine called by hand with the same settings.
    engine = make_engine("static", model, sites=SitePair("paper"), stop_token_ids=[tokenizer.eos_token_id],
                         pad_token_id=tokenizer.pad_token_id)
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    reference = engine.generate(prompt_ids, DecodeSettings(n=3, max_new_tokens=10, seed=2,
                                                           sampling=SamplingParams(min_p=0.0, max_candidates=260)))
    assert plain.token_ids == [[s.token_ids for s in p.samples] for p in reference.prompts]
    assert plain.texts[1][2] == tokenizer.decode(plain.token_ids[1][2], skip_special_tokens=True)
    assert plain.stats.tokens_generated == sum(len(t) for row in plain.token_ids for t in row)


def test_warm_start_is_found_by_fingerprint_and_used(user_checkpoints):
    model, tokenizer = tiny_pair()
    spec = DistillerSpec(hidden_size=64, rank=8)
    path = save_for(model, user_checkpoints, svd_state(model, spec), rank=8)
    common = dict(n=2, max_new_tokens=8, seed=1, chat_template=False)
    warm = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(rank=8, warm_start=True), **common)
    svd = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(rank=8, init="svd"), **common)
    random = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(rank=8), **common)
    assert warm.stats.warm_start_path == str(path) and warm.stats.init == "warm"
    assert warm.token_ids == svd.token_ids
    assert warm.stats.loss_first_step == pytest.approx(svd.stats.loss_first_step, rel=1e-6)
    assert warm.stats.loss_first_step != pytest.approx(random.stats.loss_first_step, rel=1e-3)
    explicit = esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(rank=8, warm_start_path=path),
                                 **common)
    assert explicit.token_ids == warm.token_ids and explicit.stats.init == "warm"


def test_a_model_without_a_checkpoint_names_its_fingerprint_and_the_fix(user_checkpoints):
    model, tokenizer = tiny_pair()
    with pytest.raises(CheckpointNotFoundError, match=f"fingerprint {model_fingerprint(model.config)}.*Fix"):
        esamp_pl.generate(model, tokenizer, PROMPTS, esamp=esamp_pl.ESampConfig(warm_start=True), chat_template=False)


@pytest.mark.parametrize("values, message", [
    (dict(scope="global"), "esamp.scope must be one of"),
    (dict(beta=-1.0), "esamp.beta must be a float >= 0"),
    (dict(lr=0.0), "optimizer lr must be > 0"),
    (dict(rank=0), "distiller.rank must be a positive integer"),
    (dict(init="pretrained"), "esamp.init must be one of"),
    (dict(sites="middle"), "middle"),
    (dict(init="svd", warm_start_path="x.safetensors"), "drop one of them"),
])
def test_esamp_config_rejects_bad_values_on_construction(values, message):
    with pytest.raises(ValueError, match=message):
        esamp_pl.ESampConfig(**values)


def test_kl_budget_reaches_the_engine_or_says_it_is_not_there():
    if api.engine_supports_kl_budget():
        settings = esamp_pl.ESampConfig(kl_budget=0.1, beta_max=1.5).esamp_settings(64)
        assert (settings.kl_budget, settings.beta_max) == (0.1, 1.5)
        with pytest.raises(ValueError, match="kl_budget"):
            esamp_pl.ESampConfig(kl_budget=-0.1)
    else:
        with pytest.raises(NotImplementedError, match="no KL budget"):
            esamp_pl.ESampConfig(kl_budget=0.1)
        with pytest.raises(NotImplementedError, match="beta_max"):
            esamp_pl.ESampConfig(beta_max=1.5)
    assert esamp_pl.ESampConfig().esamp_settings(64).adapter.distiller.hidden_size == 64


@pytest.mark.integration
def test_readme_examples_run_on_the_bundled_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in readme_python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    out = namespace["out"]
    assert out.stats.init == "warm" and out.stats.updates > 0
    assert Path(out.stats.warm_start_path).parts[-2:] == ("smollm2-135m", "paper-r64.distiller.safetensors")
    assert len(out.texts[0]) == 8 and all(text.strip() for text in out.texts[0])
    assert namespace["sequences"].shape[0] == 8


@pytest.mark.integration
def test_generate_gives_the_generate_scripts_tokens(tmp_path):
    import json

    from hydra import compose, initialize_config_dir

    from esamp_pl.generation import run_generation
    from esamp_pl.resources import CONF_DIR

    output = tmp_path / "out.jsonl"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["n=2", "max_new_tokens=12", "seed=3", "progress=false",
                                                       "esamp.warm_start=true", f"output={output}"])
    run_generation(cfg)
    records = [json.loads(line) for line in output.read_text().splitlines()]
    model, tokenizer = esamp_pl.load_model("smollm2-135m")
    out = esamp_pl.generate(model, tokenizer, list(cfg.prompts), n=2, max_new_tokens=12, seed=3,
                            esamp=esamp_pl.ESampConfig(warm_start=True))
    assert [[r["text"] for r in records if r["prompt_index"] == p] for p in range(len(cfg.prompts))] == out.texts
