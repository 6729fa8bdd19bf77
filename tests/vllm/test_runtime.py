"""The plugin's vLLM-independent core (bank of groups, request options, the step) on tiny tensors; no vLLM needed."""

from __future__ import annotations

import math

import pytest
import torch

from esamp_pl.sampling import SamplingParams, fuse, select_candidates
from esamp_pl.vllm.groups import GroupBank
from esamp_pl.vllm.options import PluginSettings, request_options
from esamp_pl.vllm.runtime import ESampRuntime, esamp_sampling, output_head

HIDDEN, VOCAB = 16, 40


def make_runtime(**settings) -> ESampRuntime:
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    plugin = PluginSettings(rank=4, **settings)
    return ESampRuntime(plugin, head=output_head(weight), hidden_size=HIDDEN, device="cpu",
                        initial_state=lambda init: None)


def test_request_options_parse_and_reject():
    assert request_options(None) is None
    assert request_options({"session_id": "x"}) is None  # other extra_args leave ESamp off
    assert request_options({"esamp_beta": 0.5}).beta == 0.5
    with pytest.raises(ValueError, match="esamp_beta"):
        request_options({"esamp_beta": -0.1})
    with pytest.raises(ValueError, match="unknown ESamp request key"):
        request_options({"esamp_bta": 0.25})
    with pytest.raises(ValueError, match="esamp_init"):
        request_options({"esamp_beta": 0.25, "esamp_init": "magic"})
    with pytest.raises(ValueError, match="unknown key"):
        PluginSettings.from_additional_config({"esamp": {"rnak": 8}})


def test_vllm_filters_map_to_esamp_pl():
    assert esamp_sampling(0.0, -1, 1.0, 0.1, 64) == SamplingParams(temperature=0.0, top_k=0, min_p=0.1)
    assert esamp_sampling(0.7, 20, 0.9, 0.0, 32).top_k == 20


def test_bank_widens_a_group_and_keeps_its_distiller():
    runtime = make_runtime()
    bank = runtime.bank
    assert bank.join("g", "a", slot=0) == 0
    adapter = bank.adapter("g", "random", seed=1)
    assert bank.groups["g"].capacity == 1 and bank.live_distillers == 1
    before = {name: p.clone() for name, p in adapter.bank.named_parameters()}
    assert bank.join("g", "b", slot=3) == 3  # a late member widens the group
    widened = bank.groups["g"].adapter
    assert widened is not adapter and bank.groups["g"].capacity == 4
    for name, param in widened.bank.named_parameters():
        assert torch.equal(param, before[name])
    bank.leave("g", "a")
    assert bank.live_distillers == 1
    bank.leave("g", "b")
    assert bank.live_distillers == 0 and bank.groups_freed == 1


def test_step_draws_inside_the_candidates_and_updates_each_group():
    runtime = make_runtime(record_steps=16)
    params = SamplingParams(min_p=0.1)
    runtime.add("0_p", request_options({"esamp_beta": 0.25}), params, seed=1, group="request:p", slot=0)
    runtime.add("1_p", request_options({"esamp_beta": 0.25}), params, seed=2, group="request:p", slot=1)
    runtime.add("q", request_options({"esamp_beta": 0.0}), params, seed=3, group="request:q")
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(4, VOCAB, generator=gen) * 3  # row 3: a request without ESamp
    original = logits.clone()
    source, target = torch.randn(3, HIDDEN, generator=gen), torch.randn(3, HIDDEN, generator=gen)
    runtime.step(logits, [(0, "0_p"), (1, "1_p"), (2, "q")], source, target)

    for row in (0, 1):
        finite = torch.isfinite(logits[row]).nonzero().flatten()
        assert finite.numel() == 1  # vLLM's sampler can only return this token
        candidates = select_candidates(original[row:row + 1], params)
        assert finite.item() in candidates.token_ids[0][candidates.keep[0]].tolist()
    assert torch.equal(logits[2:], original[2:])  # beta 0 and non-ESamp rows keep vLLM's draw
    assert runtime.bank.updates() == 2  # one step for each group
    record = next(r for r in runtime.records if r["request_id"] == "0_p")
    distiller = runtime.head.logits_at(record["prediction"].unsqueeze(0), record["candidate_ids"].unsqueeze(0))
    expected = fuse(record["candidate_logits"].unsqueeze(0), distiller, 0.25)[0]
    assert torch.allclose(record["fused"], expected, atol=1e-5)
    assert not math.isnan(runtime.stats()["groups"][0]["loss_per_step"][0])


def test_finishing_every_member_frees_the_group():
    runtime = make_runtime()
    params = SamplingParams(min_p=0.1)
    for round_ in range(20):
        ids = [f"{k}_r{round_}" for k in range(2)]
        for k, rid in enumerate(ids):
            runtime.add(rid, request_options({"esamp_beta": 0.25}), params, seed=k, group=f"request:r{round_}",
                        slot=k)
        runtime.step(torch.randn(2, VOCAB), [(0, ids[0]), (1, ids[1])], torch.randn(2, HIDDEN),
                     torch.randn(2, HIDDEN))
        for rid in ids:
            runtime.finish(rid)
        assert runtime.bank.live_distillers == 0 and not runtime.members
    assert runtime.bank.groups_freed == 20 and runtime.bank.updates() == 20
