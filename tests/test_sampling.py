import math
import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from esamp_pl.sampling import TIE_ROOM, SamplingParams, fuse, sample_from_candidates, select_candidates


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


def test_the_fixed_space_is_the_vocabulary_unless_top_k_bounds_the_set():
    logits = torch.zeros(2, 100)  # flat: min-p keeps every token
    cands = select_candidates(logits, SamplingParams(min_p=0.1, max_candidates=8), exact=False)
    assert cands.keep.shape == (2, 100) and cands.keep.all() and not cands.partial
    peaked = torch.arange(200.0).flip(0).repeat(4, 1)  # no ties: top_k bounds the set
    top_k = select_candidates(peaked, SamplingParams(top_k=20, min_p=0.0), exact=False)
    assert top_k.keep.shape == (4, 20 + TIE_ROOM) and (top_k.size == 20).all()
    assert not top_k.keep[:, -1].any()  # the space was not filled: nothing was cut


def test_a_tie_that_fills_the_fixed_space_is_flagged_and_the_widening_path_keeps_it_all():
    logits = torch.zeros(4, 200)  # every token ties with the k-th
    params = SamplingParams(top_k=20, min_p=0.0, max_candidates=16)
    fixed = select_candidates(logits, params, exact=False)
    assert fixed.partial and fixed.keep[:, -1].all()  # counted as truncated by the engines
    wide = select_candidates(logits, params, exact=True)
    assert wide.keep.shape == (4, 200) and wide.keep.all() and not wide.partial


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
    logits = torch.tensor([[3.0, 2.9, 2.8, -5.0, -6.0]])
    params = SamplingParams(temperature=0.0, min_p=0.5)
    cands = select_candidates(logits, params)  # 3 candidates in a space of 4
    assert cands.keep.tolist() == [[True, True, True, False]]
    scores = cands.logits.clone()
    scores[0, 1] = 10.0  # the fused score prefers the second candidate
    scores[0, 3] = 100.0  # not a candidate: must be ignored
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


LARGEST_UNIFORM = 1.0 - 2.0 ** -24  # the largest float32 below 1 (torch.rand's range is [0, 1))


def test_a_uniform_of_zero_cannot_draw_a_token_outside_the_candidate_set():
    logits = torch.full((1, 1000), -10.0)
    logits[0, 500] = 5.0
    logits[0, 3] = 0.0  # a low id, 5 logits below the top: min-p 0.1 drops it
    params = SamplingParams(min_p=0.1)
    cands = select_candidates(logits, params)
    assert sample_from_candidates(cands, cands.logits, params, torch.tensor([0.0])).item() == 500


@pytest.mark.parametrize("params", [SamplingParams(min_p=0.1), SamplingParams(top_p=0.9, min_p=0.0),
                                    SamplingParams(top_k=5, min_p=0.0, temperature=0.7),
                                    SamplingParams(min_p=0.0, max_candidates=8)])
@pytest.mark.parametrize("u", [0.0, LARGEST_UNIFORM])
def test_extreme_uniforms_land_on_kept_tokens_with_positive_probability(params, u):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 300, generator=gen) * 4
    logits[::3, 250:] = -1e4  # rows whose top tokens have high ids and whose tail has probability 0
    cands = select_candidates(logits, params)
    for scores in (cands.logits, fuse(cands.logits.float(), torch.randn(cands.logits.shape, generator=gen) * 20,
                                      beta=2.0)):
        token = sample_from_candidates(cands, scores, params, torch.full((64,), u))
        position = (cands.token_ids == token.unsqueeze(-1)).float().argmax(-1)
        assert cands.keep.gather(1, position.unsqueeze(-1)).all()
        probs = torch.softmax(scores.float().masked_fill(~cands.keep, -math.inf) / params.temperature, dim=-1)
        assert (probs.gather(1, position.unsqueeze(-1)) > 0).all()


def test_top_k_keeps_ties_with_the_kth_logit_like_hugging_face():
    row = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    for exact in (True, False):
        cands = select_candidates(row, SamplingParams(top_k=2, min_p=0.0, max_candidates=2), exact=exact)
        assert as_vocab_mask(cands, 6).tolist() == [[True, True, True, True, False, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", [
    SamplingParams(top_k=1, min_p=0.0), SamplingParams(top_k=2, min_p=0.0, max_candidates=2),
    SamplingParams(top_k=20, min_p=0.0), SamplingParams(top_k=20, top_p=0.9, min_p=0.0),
    SamplingParams(top_k=5, min_p=0.05, max_candidates=4),
])
def test_top_k_on_tied_rows_matches_hugging_face(params, dtype):
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(64, 400, generator=gen) * 3).round()  # whole numbers: many ties at every rank
    logits = logits.to(dtype)
    reference = hf_candidates(logits.float(), params)  # HF's generate warps float32 logits
    assert (reference.sum(-1) > params.top_k).any()  # ties beyond k exercised
    for exact in (True, False):
        mask = as_vocab_mask(select_candidates(logits, params, exact=exact), 400)
        if params.top_p < 1:
            # top-p's cut may fall inside a run of tied tokens, where HF's sort and ours pick different (equally
            # likely) members: the same count, all within the top-k set.
            assert torch.equal(mask.sum(-1), reference.sum(-1))
            assert not (mask & ~hf_candidates(logits.float(), SamplingParams(top_k=params.top_k, min_p=0.0))).any()
        else:
            assert torch.equal(mask, reference)
    if dtype == torch.bfloat16 and params.min_p == 0 and params.top_p == 1:  # HF's warper on the bf16 tensor itself
        assert torch.equal(hf_candidates(logits, params), reference)


@pytest.mark.parametrize("params", [SamplingParams(min_p=0.0), SamplingParams(min_p=0.1),
                                    SamplingParams(top_p=0.95, min_p=0.0), SamplingParams(temperature=3.0, top_p=0.99)])
def test_the_fixed_candidate_space_keeps_everything_the_filters_keep(params):
    # Nearly flat (no exact ties, so top-p's cut is unambiguous): min-p and top-p keep most of the vocabulary.
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * torch.tensor([[1e-3], [0.1], [0.3]])
    fixed = select_candidates(logits, params, exact=False)
    assert torch.equal(as_vocab_mask(fixed, 500), hf_candidates(logits, params))
    assert not fixed.partial and (fixed.size > params.max_candidates).all()


def test_the_widening_space_narrows_to_a_power_of_two_that_holds_every_set_and_samples_the_same_tokens():
    torch.manual_seed(0)
    logits = torch.randn(8, 1000) * 4
    params = SamplingParams(min_p=0.1, max_candidates=64)
    narrow = select_candidates(logits, params)
    width, largest = narrow.keep.shape[-1], int(narrow.size.max())
    assert width < 64 and width & (width - 1) == 0 and width // 2 < largest <= width
    assert not narrow.partial  # nothing of C was cut: the set is exact
    full = select_candidates(logits, dataclasses.replace(params, max_candidates=1000))  # the whole vocabulary
    assert torch.equal(as_vocab_mask(narrow, 1000), as_vocab_mask(full, 1000))
    uniform = torch.rand(8)
    assert torch.equal(sample_from_candidates(narrow, narrow.logits, params, uniform),
                       sample_from_candidates(full, full.logits, params, uniform))
    logits[3, :100] = 20.0  # one row keeps 100 tokens: the space widens to the vocabulary, then narrows to 128
    widened = select_candidates(logits, params)
    assert widened.keep.shape == (8, 128) and int(widened.size[3]) == 100 and not widened.partial
    assert torch.equal(as_vocab_mask(widened, 1000), hf_candidates(logits, params))


def test_widening_searches_only_the_rows_that_fill_the_space_and_only_as_wide_as_needed(monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(16, 50_000) * 4
    logits[5, :300] = 30.0  # one row keeps 300 tokens under min-p: 64 -> 1024 is enough, no full sort
    params = SamplingParams(min_p=0.1, max_candidates=64)
    searches = []
    topk = torch.topk

    def spy(x, k, **kwargs):
        searches.append((x.shape[0], k))
        return topk(x, k, **kwargs)

    monkeypatch.setattr(torch, "topk", spy)
    cands = select_candidates(logits, params)
    assert searches == [(16, 64), (1, 1024)]
    assert cands.keep.shape == (16, 512) and int(cands.size[5]) == 300
    assert torch.equal(as_vocab_mask(cands, 50_000), hf_candidates(logits, params))
    assert torch.equal(cands.logits, logits.gather(1, cands.token_ids))  # padding repeats real (token, logit) pairs
