"""Distiller checkpoints: round trip, atomic write, corruption, mismatch and lookup errors; the three inits."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from esamp_pl.checkpoint import (CheckpointCorruptError, CheckpointError, CheckpointMeta, CheckpointMismatchError,
                                 CheckpointNotFoundError, checkpoint_filename, find_checkpoint, load_checkpoint,
                                 save_checkpoint, validate_checkpoint)
from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.init import initial_distiller_state, svd_state
from esamp_pl.models import model_fingerprint
from tests.conftest import tiny_model

SPEC = DistillerSpec(hidden_size=64, rank=8)


def trained_state(spec: DistillerSpec = SPEC, seed: int = 1) -> dict[str, torch.Tensor]:
    bank = DistillerBank(spec, 1, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for param in bank.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + 7)) * 0.1)
    return bank.single_state()


def meta_for(model, spec: DistillerSpec = SPEC, sites: str = "paper", name: str = "tiny") -> CheckpointMeta:
    return CheckpointMeta(model_name=name, model_id="local/tiny", model_fingerprint=model_fingerprint(model.config),
                          sites=sites, distiller=dataclasses.asdict(spec), corpus={"name": "unit", "key": "abc"},
                          steps=12, metrics={"val/mse": 1.5, "val/mse_random": 3.0})


def loaded_for(model, name: str = "tiny"):
    """The parts of esamp_pl.models.LoadedModel the init code reads."""
    return SimpleNamespace(model=model, spec=SimpleNamespace(name=name), fingerprint=model_fingerprint(model.config))


@pytest.fixture
def saved(tmp_path, tiny_llama):
    state = trained_state()
    path = save_checkpoint(tmp_path / "tiny" / checkpoint_filename("paper", SPEC), state, meta_for(tiny_llama))
    return path, state


def test_round_trip_is_bit_identical_with_metadata(saved, tiny_llama):
    path, state = saved
    loaded, meta = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for name in state:
        assert torch.equal(loaded[name], state[name]) and loaded[name].dtype == torch.float32
    assert meta.model_fingerprint == model_fingerprint(tiny_llama.config)
    assert meta.sites == "paper" and meta.hidden_size == 64 and meta.distiller_spec() == SPEC
    assert meta.steps == 12 and meta.metrics["val/mse"] == 1.5 and meta.corpus["name"] == "unit"
    assert meta.package_version and len(meta.sha256) == 64
    bank = DistillerBank(SPEC, 3)
    bank.load_single(loaded)
    assert torch.equal(bank.single_state(2)["down"], state["down"])


def test_write_is_atomic_and_leaves_no_temp_files(saved, tiny_llama, monkeypatch):
    path, state = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("esamp_pl.checkpoint.save_file", crash)
    with pytest.raises(OSError):
        save_checkpoint(path, trained_state(seed=5), meta_for(tiny_llama))
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_truncated_file_is_a_clear_error(saved):
    path, _ = saved
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointCorruptError, match="truncated or corrupted.*re-create"):
        load_checkpoint(path)


def test_tampered_weights_fail_the_checksum(saved):
    path, _ = saved
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one byte of the last tensor
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match="altered"):
        load_checkpoint(path)


def test_tampered_metadata_is_detected(saved):
    path, _ = saved
    raw = path.read_bytes()
    before = b'\\"sites\\": \\"paper\\"'
    after = b'\\"sites\\":  \\"tllm\\"'  # relabelled for another site pair, same header length
    assert raw.count(before) == 1 and len(before) == len(after)
    path.write_bytes(raw.replace(before, after))
    with pytest.raises(CheckpointCorruptError, match="altered"):
        load_checkpoint(path)


def test_foreign_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointCorruptError, match="not an esamp_pl Distiller checkpoint"):
        load_checkpoint(path)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="pretrain_distiller"):
        load_checkpoint(tmp_path / "nope.distiller.safetensors")


@pytest.mark.parametrize("change, expected", [
    (dict(model_fingerprint="0123456789abcdef"), "model fingerprint: expected .* found 0123456789abcdef"),
    (dict(sites="tllm"), "sites: expected 'paper', found 'tllm'"),
    (dict(distiller=dataclasses.asdict(DistillerSpec(hidden_size=96, rank=8))), "hidden size: expected 64, found 96"),
    (dict(distiller=dataclasses.asdict(DistillerSpec(hidden_size=64, rank=16))), "distiller.rank: expected 8, found 16"),
])
def test_mismatch_names_expected_and_found(tiny_llama, change, expected):
    meta = dataclasses.replace(meta_for(tiny_llama), **change)
    with pytest.raises(CheckpointMismatchError, match=expected) as info:
        validate_checkpoint(meta, model_fingerprint=model_fingerprint(tiny_llama.config), sites="paper", spec=SPEC,
                            model_name="running-model")
    assert "pretrain_distiller.py model=running-model " in str(info.value)


def test_find_checkpoint(tmp_path, saved):
    path, _ = saved
    assert find_checkpoint("tiny", "paper", tmp_path, spec=SPEC) == path
    assert find_checkpoint("tiny", "paper", tmp_path) == path
    with pytest.raises(CheckpointNotFoundError, match="found only .*paper-r8"):
        find_checkpoint("tiny", "paper", tmp_path, spec=DistillerSpec(hidden_size=64, rank=16))
    with pytest.raises(CheckpointNotFoundError, match="model=other.*warm_start=false"):
        find_checkpoint("other", "tllm", tmp_path)
    save_checkpoint(tmp_path / "tiny" / "paper-r16.distiller.safetensors",
                    trained_state(DistillerSpec(hidden_size=64, rank=16)), meta_for(tiny_model(), DistillerSpec(64, 16)))
    with pytest.raises(CheckpointError, match="several"):
        find_checkpoint("tiny", "paper", tmp_path)


def test_warm_init_loads_and_validates(tmp_path, saved, tiny_llama):
    path, state = saved
    warm = initial_distiller_state("warm", loaded_model=loaded_for(tiny_llama), sites="paper", distiller_spec=SPEC,
                                   checkpoints_dir=tmp_path)
    assert all(torch.equal(warm[k], state[k]) for k in state)
    explicit = initial_distiller_state("warm", loaded_model=loaded_for(tiny_llama), sites="paper",
                                       distiller_spec=SPEC, warm_start_path=path)
    assert torch.equal(explicit["up"], state["up"])
    assert initial_distiller_state("random", loaded_model=loaded_for(tiny_llama), sites="paper",
                                   distiller_spec=SPEC) is None


def test_warm_init_refuses_other_model_sites_and_missing(tmp_path, saved):
    path, _ = saved
    other = tiny_model("llama", intermediate_size=96)  # another architecture: another fingerprint
    with pytest.raises(CheckpointMismatchError, match="model fingerprint"):
        initial_distiller_state("warm", loaded_model=loaded_for(other), sites="paper", distiller_spec=SPEC,
                                warm_start_path=path)
    with pytest.raises(CheckpointNotFoundError, match="sites 'tllm'"):
        initial_distiller_state("warm", loaded_model=loaded_for(tiny_model()), sites="tllm", distiller_spec=SPEC,
                                checkpoints_dir=tmp_path)
    with pytest.raises(CheckpointNotFoundError):
        initial_distiller_state("warm", loaded_model=loaded_for(tiny_model(), name="absent"), sites="paper",
                                distiller_spec=SPEC, checkpoints_dir=tmp_path)
    with pytest.raises(ValueError, match="esamp.init"):
        initial_distiller_state("zeros", loaded_model=loaded_for(tiny_model()), sites="paper", distiller_spec=SPEC)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_svd_init_is_the_rank_r_linearised_last_ffn(kind):
    model = tiny_model(kind)
    spec = DistillerSpec(hidden_size=64, rank=8, output_norm=False)
    state = svd_state(model, spec)
    bank = DistillerBank(spec, 1)
    bank.load_single(state)
    mlp = model.model.layers[-1].mlp
    linear = mlp.down_proj.weight @ ((mlp.up_proj.weight + mlp.gate_proj.weight) / 2)
    u, s, vh = torch.linalg.svd(linear)
    best = (u[:, :8] * s[:8]) @ vh[:8]  # rank-8 truncation of the map
    source = torch.randn(5, 64)
    expected = source + source @ best.T
    torch.testing.assert_close(bank(source[None])[0], expected, rtol=1e-4, atol=1e-5)
    normed = svd_state(model, DistillerSpec(hidden_size=64, rank=8))
    assert torch.equal(normed["norm_weight"], torch.ones(1, 1, 64))
    assert torch.count_nonzero(normed["gate"]) == 0


def test_svd_init_through_the_common_entry(tiny_llama):
    state = initial_distiller_state("svd", loaded_model=loaded_for(tiny_llama), sites="paper", distiller_spec=SPEC)
    assert state["up"].shape == (1, 1, 64, 8)
    with pytest.raises(ValueError, match="hidden size is 32"):
        svd_state(tiny_llama, DistillerSpec(hidden_size=32, rank=8))


def test_non_finite_weights_with_a_valid_checksum_are_refused(tmp_path, tiny_llama):
    """A NaN Distiller would make every fused score NaN-free but useless: ESamp silently off. Refuse it."""
    from safetensors.torch import save_file

    from esamp_pl.checkpoint import META_KEY, content_digest

    state = {k: v.clone() for k, v in trained_state().items()}
    state["up"][0, 0, 0, 0] = float("nan")
    state["down"][0, 0, 0, 0] = float("inf")
    meta = meta_for(tiny_llama)
    meta = dataclasses.replace(meta, sha256=content_digest(state, meta))
    path = tmp_path / "nan.distiller.safetensors"
    save_file(state, str(path), metadata={META_KEY: meta.to_json(), "format": "pt"})
    with pytest.raises(CheckpointCorruptError, match=r"NaN or infinite weights in \['down', 'up'\]"):
        load_checkpoint(path)
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path / "again.distiller.safetensors", state, meta)
    assert not (tmp_path / "again.distiller.safetensors").exists()


def test_a_directory_as_checkpoint_says_it_is_a_directory(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="is a directory"):
        load_checkpoint(tmp_path)
