"""Shared fixtures: tiny random decoder LMs built in memory (no download, milliseconds)."""

import pytest
import torch
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),  # final logit soft-capping
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM),
}


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` tests skip, with the reason shown, on a machine without a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marker: cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


def tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    config_cls, model_cls = ARCHITECTURES[kind]
    config = config_cls(**{**TINY, **overrides})
    return model_cls(config).eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_lm(request):
    return tiny_model(request.param)


@pytest.fixture(params=sorted(ARCHITECTURES))
def any_tiny_lm(request):
    """Every supported decoder family, for the tests that must hold across architectures."""
    return tiny_model(request.param, head_dim=16)


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
"Tensor methods that read a device value on the host (a synchronisation on CUDA)"


@pytest.fixture
def forbid_host_reads_in_static_step(monkeypatch):
    """Make every host read of a tensor inside ``StaticDecodeEngine._decode_step`` raise (the step must stay
    capturable in a CUDA graph). Apply to an engine with ``fixed_candidates = True``: the CUDA layout; on a
    CPU the widening candidate space's one host read is allowed."""
    from esamp_pl.static_engine import StaticDecodeEngine

    step, inside = StaticDecodeEngine._decode_step, []

    def guarded(self, *args):
        inside.append(True)
        try:
            step(self, *args)
        finally:
            inside.pop()

    for name in HOST_READS:
        original = getattr(torch.Tensor, name)

        def check(tensor, *args, _name=name, _original=original, **kwargs):
            if inside:
                raise AssertionError(f"Tensor.{_name} (a host synchronisation) inside the decode step")
            return _original(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, check)
    monkeypatch.setattr(StaticDecodeEngine, "_decode_step", guarded)
