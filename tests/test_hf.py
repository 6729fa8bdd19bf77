"""model.generate(custom_generate=esamp_pl.hf.CUSTOM_GENERATE, ...): HF's arguments and layout, esamp_pl's tokens."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import esamp_pl
import esamp_pl.hf
from esamp_pl.api import generate_ids
from esamp_pl.sampling import SamplingParams
from tests.test_api import tiny_pair as tiny_api_pair

TEXTS = ["The river bends twice before", "A kite"]
STOPS = list(range(60, 80))  # frequent enough in a flat tiny model that rows stop at different steps


def tiny_pair():
    model, tokenizer = tiny_api_pair()
    model.generation_config.eos_token_id = STOPS
    return model, tokenizer


def hf_generate(model, inputs, **kwargs):
    return model.generate(**inputs, custom_generate=esamp_pl.hf.CUSTOM_GENERATE, trust_remote_code=True, **kwargs)


def expected_sequences(model, inputs, n, max_new_tokens, pad, sampling, seed):
    """HF's layout built from esamp_pl's plain sampling: prompt as given, new tokens, first EOS id, pad."""
    prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
    result, _ = generate_ids(model, prompt_ids, stop_token_ids=STOPS, pad_token_id=pad, n=n,
                             max_new_tokens=max_new_tokens, esamp=None, sampling=sampling, seed=seed)
    new = [s.token_ids + ([STOPS[0]] if s.finish_reason == "stop" else []) for p in result.prompts for s in p.samples]
    assert {s.finish_reason for p in result.prompts for s in p.samples} == {"stop", "length"}  # both layouts seen
    width = max(map(len, new))
    tail = torch.tensor([tokens + [pad] * (width - len(tokens)) for tokens in new])
    return torch.cat([inputs["input_ids"].repeat_interleave(n, dim=0), tail], dim=1)


def test_beta_zero_gives_esamp_pl_plain_sampling_in_hf_layout():
    model, tokenizer = tiny_pair()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    sequences = hf_generate(model, inputs, do_sample=True, min_p=0.05, num_return_sequences=4, max_new_tokens=12,
                            esamp_beta=0.0, esamp_seed=7)
    # HF's default top_k (50) applies, as in model.generate without custom_generate.
    expected = expected_sequences(model, inputs, 4, 12, tokenizer.pad_token_id,
                                  SamplingParams(top_k=50, min_p=0.05), seed=7)
    assert torch.equal(sequences, expected)
    on = hf_generate(model, inputs, do_sample=True, min_p=0.05, num_return_sequences=4, max_new_tokens=12,
                     esamp_beta=0.5, esamp_seed=7)
    assert not torch.equal(on, sequences)


def test_torch_manual_seed_repeats_a_call_and_the_generation_config_is_honoured():
    model, tokenizer = tiny_pair()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    first = hf_generate(model, inputs, do_sample=True, num_return_sequences=3, max_new_tokens=6)
    torch.manual_seed(0)
    assert torch.equal(first, hf_generate(model, inputs, do_sample=True, num_return_sequences=3, max_new_tokens=6))
    model.generation_config.top_k = 1  # the model's own generation config: only the top token survives
    model.generation_config.eos_token_id = [259]
    width = inputs["input_ids"].shape[1]
    greedy = hf_generate(model, inputs, do_sample=True, num_return_sequences=3, max_length=width + 5)
    assert greedy.shape == (6, width + 5)
    assert all(torch.equal(greedy[3 * p], greedy[3 * p + j]) for p in range(2) for j in range(3))
    argmax = hf_generate(model, inputs, do_sample=False, num_return_sequences=1, max_new_tokens=5,
                         return_dict_in_generate=True, esamp_enabled=False)  # the LM's own greedy decoding
    assert torch.equal(argmax.sequences, greedy[::3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(repetition_penalty=1.3), "does not apply \\['repetition_penalty=1.3'\\]"),
    (dict(num_beams=2), "num_beams=2"),
    (dict(esamp_bta=0.3), "unknown ESamp argument\\(s\\) \\['esamp_bta'\\]"),
    (dict(esamp_scope="global"), "esamp.scope must be one of"),
    (dict(foo=1), "does not apply \\['argument foo'\\]"),
])
def test_what_cannot_be_honoured_is_an_error(kwargs, message):
    model, tokenizer = tiny_pair()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=message):
        hf_generate(model, inputs, do_sample=True, max_new_tokens=4, **kwargs)


def test_custom_generate_works_without_a_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network access during custom_generate")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    model, tokenizer = tiny_pair()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    sequences = hf_generate(model, inputs, do_sample=True, num_return_sequences=2, max_new_tokens=3, esamp_seed=0)
    assert sequences.shape[0] == 4


def test_the_custom_generate_folder_is_shipped_and_needs_trust_remote_code():
    assert (Path(esamp_pl.hf.CUSTOM_GENERATE) / "custom_generate" / "generate.py").is_file()
    model, tokenizer = tiny_pair()
    inputs = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="trust_remote_code"):
        model.generate(**inputs, custom_generate=esamp_pl.hf.CUSTOM_GENERATE, max_new_tokens=4)


@pytest.mark.integration
def test_custom_generate_on_the_bundled_model():
    model, tokenizer = esamp_pl.load_model("smollm2-135m")
    inputs = tokenizer(["Give me an unusual idea for a weekend project.", "Name a colour."], return_tensors="pt",
                       padding=True)
    common = dict(do_sample=True, min_p=0.1, num_return_sequences=4, max_new_tokens=16, esamp_seed=0)
    esamp = hf_generate(model, inputs, esamp_beta=0.25, esamp_warm_start=True, **common)
    width = inputs["input_ids"].shape[1]
    assert esamp.shape[0] == 8 and width < esamp.shape[1] <= width + 16
    assert torch.equal(esamp[:, :width], inputs["input_ids"].repeat_interleave(4, dim=0))
    zero = hf_generate(model, inputs, esamp_beta=0.0, **common)
    plain = hf_generate(model, inputs, esamp_enabled=False, **common)
    assert torch.equal(zero, plain) and not torch.equal(esamp, plain)
