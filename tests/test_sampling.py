import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from esamp_pl.sampling import SamplingParams, fuse, sample_from_candidates, select_candidates


def hf_candidates(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Reference: the candidate mask that Hugging Face's warpers leave finite, in HF's order."""
    scores = logits.clone()
    if p.temperature > 0:
        scores = TemperatureLogitsWarper(p.temperature)(None, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    return torch.isfinite(scores)


def as_vocab_mask(cands, vocab: int) -> torch.Tensor:
    mask = torch.zeros(cands.keep.shape[0], vocab, dtype=torch.bool)
    return mask.scatter(1, cands.token_ids, cands.keep)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.7, min_p=0.05, max_candidates=8),
    SamplingParams(temperature=1.3, top_p=0.9, min_p=0.0),
    SamplingParams(temperature=1.0, top_p=0.95, min_p=0.0, max_candidates=4),  # forces widening
    SamplingParams(temperature=1.0, top_k=20, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, top_k=100, min_p=0.0, max_candidates=16),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_candidates=16),  # no filter: all
])
def test_filters_match_hugging_face_warpers(params):
    torch.manual_seed(0)
    logits = torch.randn(6, 500) * 3
    cands = select_candidates(logits, params)
    assert torch.equal(as_vocab_mask(cands, 500), hf_candidates(logits, params))
    # Candidates are a prefix of the tokens sorted by logit and carry the raw logits.
    assert torch.equal(cands.logits, logits.gather(1, cands.token_ids))
    k = cands.keep.long()
    assert torch.all(k[:, 1:] <= k[:, :-1])


def test_min_p_keeps_the_argmax_even_when_flat_or_peaked():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, -1.0, -2.0]])
    cands = select_candidates(logits, SamplingParams(min_p=1.0))
    mask = as_vocab_mask(cands, 4)
    assert mask[1].tolist() == [True, False, False, False]
    assert mask[0].sum() >= 1
    assert mask[torch.arange(2), logits.argmax(-1)].all()


def test_inexact_mode_truncates_to_the_candidate_space():
    logits = torch.zeros(2, 100)
    cands = select_candidates(logits, SamplingParams(min_p=0.1, max_candidates=8), exact=False)
    assert cands.keep.shape == (2, 8) and cands.partial


def test_a_top_k_space_that_holds_every_candidate_is_not_partial():
    logits = torch.zeros(4, 100)  # flat: every filter keeps as much as it can
    for exact in (True, False):
        cands = select_candidates(logits, SamplingParams(top_k=20, min_p=0.0, max_candidates=64), exact=exact)
        assert cands.keep.shape == (4, 20) and cands.keep.all() and not cands.partial
    wide = select_candidates(logits, SamplingParams(top_k=50, min_p=0.0, max_candidates=16), exact=True)
    assert wide.keep.shape == (4, 50) and not wide.partial  # widened to top_k, not the vocabulary


def test_fusion_is_the_formula_on_candidates_and_never_adds_a_token():
    torch.manual_seed(0)
    logits = torch.randn(4, 300) * 2
    params = SamplingParams(min_p=0.1)
    cands = select_candidates(logits, params)
    d = torch.randn_like(cands.logits) * 5
    fused = fuse(cands.logits, d, beta=0.25)
    torch.testing.assert_close(fused, 1.25 * cands.logits - 0.25 * d)
    # Whatever the Distiller says, sampling stays inside C.
    for seed in range(50):
        u = torch.rand(4, generator=torch.Generator().manual_seed(seed))
        token = sample_from_candidates(cands, fused, params, u)
        assert as_vocab_mask(cands, 300)[torch.arange(4), token].all()


def test_fusion_falls_back_to_lm_logits_for_non_finite_distiller_rows():
    lm = torch.tensor([[1.0, 0.5], [2.0, 1.0]])
    d = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    fused = fuse(lm, d, 0.5)
    assert torch.equal(fused[0], lm[0])
    torch.testing.assert_close(fused[1], 1.5 * lm[1] - 0.5 * d[1])


def test_sampler_follows_the_candidate_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(20000, 1)
    params = SamplingParams(temperature=1.0, min_p=0.2)  # drops the 0.05 token
    cands = select_candidates(logits, params)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    tokens = sample_from_candidates(cands, cands.logits, params, u)
    freq = torch.bincount(tokens, minlength=4).float() / 20000
    expected = torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95
    torch.testing.assert_close(freq, expected, atol=0.015, rtol=0)


def test_sampler_follows_the_distribution_when_vocab_order_differs_from_logit_order():
    probs = torch.tensor([0.05, 0.3, 0.15, 0.5])  # the most likely token has the highest id
    logits = probs.log().repeat(20000, 1)
    params = SamplingParams(temperature=1.0, min_p=0.2)
    cands = select_candidates(logits, params)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(2))
    freq = torch.bincount(sample_from_candidates(cands, cands.logits, params, u), minlength=4).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.3, 0.15, 0.5]) / 0.95, atol=0.015, rtol=0)


def test_float_noise_on_near_tied_logits_rarely_changes_the_token():
    """1e-5 of noise (what another batch shape or engine gives) must not reshuffle a flat distribution."""
    gen = torch.Generator().manual_seed(3)
    rows, vocab = 2000, 300
    logits = torch.randn(rows, vocab, generator=gen) * 1e-3  # ~300 near-tied tokens, all candidates
    noisy = logits + torch.randn(rows, vocab, generator=gen) * 1e-5
    params = SamplingParams(temperature=1.0, min_p=0.0, max_candidates=vocab)
    u = torch.rand(rows, generator=gen)
    picks = [sample_from_candidates(c, c.logits, params, u) for c in map(lambda x: select_candidates(x, params),
                                                                          (logits, noisy))]
    assert (picks[0] != picks[1]).sum() <= rows // 100  # in logit order about every row would change


def test_temperature_reshapes_the_sampled_distribution():
    probs = torch.tensor([0.6, 0.4])
    logits = probs.log().repeat(20000, 1)
    params = SamplingParams(temperature=0.5, min_p=0.0)
    cands = select_candidates(logits, params)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1))
    freq = torch.bincount(sample_from_candidates(cands, cands.logits, params, u), minlength=2).float() / 20000
    sharp = probs ** 2 / (probs ** 2).sum()
    torch.testing.assert_close(freq, sharp, atol=0.015, rtol=0)


def test_greedy_takes_argmax_of_fused_scores_within_candidates():
    logits = torch.tensor([[3.0, 2.9, -5.0]])
    params = SamplingParams(temperature=0.0, min_p=0.5)
    cands = select_candidates(logits, params)
    scores = cands.logits.clone()
    scores[0, 1] = 10.0  # the fused score prefers the second candidate
    scores[0, 2] = 100.0  # not a candidate: must be ignored
    token = sample_from_candidates(cands, scores, params, torch.zeros(1))
    assert cands.token_ids[0, 1] == 1 and token.item() == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_p=1.5), "min_p has to be a float in the \\[0, 1\\] interval, but is 1.5"),
    (dict(min_p=-0.1), "min_p"),
    (dict(top_p=0.0), "top_p has to be a float in the \\(0, 1\\]"),
    (dict(top_p=1.2), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_k=-3), "top_k"),
])
def test_bad_sampling_values_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
