"""Meta pre-training: episodes replay generation, a Reptile step moves the init, and a run resumes."""

from pathlib import Path

import pytest
import torch

from esamp_pl.adapter import AdapterSpec
from esamp_pl.checkpoint import load_checkpoint
from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.pretrain.meta import (EpisodeSpec, EpisodeStream, online_spec, read_episode, replay,
                                    run_meta_pretraining, stack_episodes, write_episodes)
from esamp_pl.pretrain.shards import ShardStore, ShardWriter
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from tests.pretrain.conftest import CrashAt, FirstStep, tiny_model_config

PROMPTS = [[5, 6, 7], [8, 9, 10, 11]]


def test_an_episode_replays_the_online_steps_the_engine_ran(tiny_llama, tmp_path):
    """Replaying a prompt's stored pairs through the adapter gives the engine's own loss curve."""
    stops = [30, 31, 32, 33, 34]  # rows stop at different steps: the active masks matter
    engine = DecodeEngine(tiny_llama, sites=SitePair(), stop_token_ids=stops, pad_token_id=0)
    spec = EpisodeSpec(num_prompts=2, val_prompts=1, n=3, max_new_tokens=12, generation_batch_size=2,
                       cache_dtype="float32", shard_rows=16)  # several shards: episodes cross shard boundaries
    with ShardWriter(tmp_path / "episodes", shard_rows=spec.shard_rows) as writer:
        episodes = write_episodes(tiny_llama, engine, SitePair(), PROMPTS, spec, writer)
        store = writer.close({"hidden_size": 64, "episodes": episodes})
    assert len(store.index["shards"]) > 1 and [e["prompt"] for e in episodes] == [0, 1]

    adapter = AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode="sync")
    state = DistillerBank(adapter.distiller, 1, generator=torch.Generator().manual_seed(7)).single_state()
    settings = DecodeSettings(n=3, max_new_tokens=12, seed=spec.seed, esamp=ESampSettings(adapter, beta=0.0),
                              sampling=SamplingParams(temperature=spec.temperature, min_p=spec.min_p))
    generated = engine.generate(PROMPTS, settings, initial_state=state)  # beta 0: the episodes' very tokens
    assert {s.finish_reason for p in generated.prompts for s in p.samples} == {"stop", "length"}
    batch = stack_episodes([read_episode(ShardStore.open(store.folder), e, 3, spec.steps) for e in episodes])
    assert batch["active"].sum(0).tolist() == [min(len(s.token_ids), spec.steps)
                                               for p in generated.prompts for s in p.samples]
    replayed = replay(adapter, batch, 3, state).stats()
    assert replayed.updates == generated.adapter_stats.updates > 0
    torch.testing.assert_close(replayed.loss_per_step, generated.adapter_stats.loss_per_step, rtol=1e-4, atol=1e-6)


def meta_config(model_dir: Path, tmp_path: Path, *overrides: str):
    """conf/pretrain_meta.yaml with a tiny local model and a few short episodes."""
    return tiny_model_config(
        "pretrain_meta", model_dir, "episodes.num_prompts=6", "episodes.val_prompts=2", "episodes.n=2",
        "episodes.max_new_tokens=6", "episodes.generation_batch_size=6", "prompts_per_step=2", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "checkpoint_every=1", f"checkpoints_dir={tmp_path / 'checkpoints'}", f"run_dir={tmp_path / 'run'}",
        *overrides)


EXPORT = Path("checkpoints") / "tiny" / "paper-r8-meta.distiller.safetensors"


def test_a_reptile_step_moves_the_init_to_the_mean_of_the_adapted_distillers(tiny_model_dir, tmp_path, cache_env):
    cfg = meta_config(tiny_model_dir, tmp_path, "trainer.max_steps=1", "outer_optimizer.lr=1.0")
    path = run_meta_pretraining(cfg)
    assert path == tmp_path / EXPORT
    state, meta = load_checkpoint(path)
    assert meta.steps == 1 and meta.corpus["source"] == "episodes" and meta.corpus["n"] == 2
    assert {"val/online_relative_error", "val/online_relative_error_random"} <= meta.metrics.keys()

    store = ShardStore.open(next((cache_env / "episodes" / "tiny").iterdir()))
    spec = DistillerSpec(hidden_size=64, rank=8)
    random = DistillerBank(spec, 1, generator=torch.Generator().manual_seed(cfg.seed)).single_state()
    train = [e for e in store.index["episodes"] if e["split"] == "train"]
    batch = EpisodeStream(store, train, 2, seed=cfg.seed).batch(0)
    adapted = replay(online_spec(meta.training["adapter"], spec), batch, 2, random)
    # lr 1: init - 1 * (init - mean adapted) = the mean of the two prompts' adapted Distillers.
    for name, tensor in adapted.bank.named_parameters():
        torch.testing.assert_close(state[name], tensor.detach().mean(0, keepdim=True), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(state[name], random[name]) for name in state)


def test_an_interrupted_run_resumes_to_the_same_init(tiny_model_dir, tmp_path, cache_env):
    straight = load_checkpoint(run_meta_pretraining(meta_config(tiny_model_dir, tmp_path / "a")))[0]
    cfg = meta_config(tiny_model_dir, tmp_path / "b")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_meta_pretraining(cfg, callbacks=[CrashAt(2)])
    assert (tmp_path / "b" / "run" / "lightning" / "last.ckpt").is_file()
    first = FirstStep()
    state, meta = load_checkpoint(run_meta_pretraining(cfg, callbacks=[first]))
    assert meta.steps == 4 and first.first == 2  # it went on from the crash, not from scratch
    for name in straight:
        torch.testing.assert_close(state[name], straight[name], rtol=0, atol=0)


def test_a_run_stopped_before_its_first_step_leaves_nothing_to_resume(tiny_model_dir, tmp_path, cache_env):
    """Killed while answering its prompts, a run saves no checkpoint; a stale weightless one is set aside."""
    def crash():
        raise RuntimeError("simulated crash while generating the episodes")

    cfg = meta_config(tiny_model_dir, tmp_path)
    with pytest.raises(RuntimeError, match="simulated crash while generating"):
        run_meta_pretraining(cfg, load=crash)
    last = tmp_path / "run" / "lightning" / "last.ckpt"
    assert not last.exists()
    # what an earlier version left in that case: a checkpoint of step 0 without the Distiller's weights
    last.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": 0, "state_dict": {}, "optimizer_states": []}, last)
    first = FirstStep()
    state, meta = load_checkpoint(run_meta_pretraining(cfg, callbacks=[first]))
    assert meta.steps == 4 and first.first == 0


def test_bad_episode_settings_name_the_fix():
    with pytest.raises(ValueError, match="episodes.val_prompts \\(8\\) must be below episodes.num_prompts \\(8\\)"):
        EpisodeSpec(num_prompts=8, val_prompts=8)
    with pytest.raises(ValueError, match="episodes.max_new_tokens must be an integer >= 2"):
        EpisodeSpec(max_new_tokens=1)
    with pytest.raises(ValueError, match="esamp.learn must be true"):
        online_spec({"learn": False}, DistillerSpec(hidden_size=8))


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "fsdp"])
def test_every_trainer_config_composes_for_manual_optimisation(tiny_model_dir, tmp_path, trainer):
    cfg = meta_config(tiny_model_dir, tmp_path, f"trainer={trainer}")
    assert cfg.trainer.gradient_clip_val is None  # Lightning refuses automatic clipping with manual optimisation
    assert cfg.trainer._target_ == "lightning.pytorch.Trainer" and cfg.esamp.update_every == 1
