import math

import pytest
import torch

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings, choose_token, left_pad
from esamp_pl.esamp import ESampStep
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import ENGINES, make_engine
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]


def engine_for(model, stop=(2,)):
    return DecodeEngine(model, sites=SitePair(), stop_token_ids=list(stop), pad_token_id=0)


def esamp(beta=0.25, **adapter):
    return ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), **adapter), beta=beta)


def tokens(result):
    return [s.token_ids for p in result.prompts for s in p.samples]


def test_beta_zero_gives_bit_identical_tokens_to_esamp_off(tiny_lm):
    engine = engine_for(tiny_lm)
    base = DecodeSettings(n=3, max_new_tokens=24, seed=7, sampling=SamplingParams(min_p=0.0, top_p=0.95))
    off = engine.generate(PROMPTS, base)
    zero = engine.generate(PROMPTS, DecodeSettings(**{**base.__dict__, "esamp": esamp(beta=0.0)}))
    assert tokens(off) == tokens(zero)
    assert zero.adapter_stats.updates > 0  # the Distillers did learn, only the tilt was off
    on = engine.generate(PROMPTS, DecodeSettings(**{**base.__dict__, "esamp": esamp(beta=0.25)}))
    assert tokens(on) != tokens(off)


def test_same_seed_same_tokens_and_rows_differ(tiny_llama):
    engine = engine_for(tiny_llama)
    settings = DecodeSettings(n=4, max_new_tokens=16, seed=3, esamp=esamp(), sampling=SamplingParams(min_p=0.0))
    a, b = engine.generate(PROMPTS, settings), engine.generate(PROMPTS, settings)
    assert tokens(a) == tokens(b)
    assert len({tuple(t) for t in tokens(a)[:4]}) > 1


def test_updates_are_one_per_prompt_per_decode_step_while_rows_run(tiny_llama):
    engine = engine_for(tiny_llama, stop=(256,))  # outside the vocabulary of 256: no row can stop
    result = engine.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=10, esamp=esamp(),
                                                     sampling=SamplingParams(min_p=0.5)))
    assert result.steps == 9  # the first token comes from the prefill: not a decode step
    assert all(s.finish_reason == "length" for p in result.prompts for s in p.samples)
    assert result.adapter_stats.updates == 9 * len(PROMPTS)
    assert len(result.adapter_stats.loss_per_step) == 9


def test_finished_rows_stop_and_are_not_trained(tiny_llama):
    # Make one token certain to be sampled first for every row so every row stops at once.
    engine = engine_for(tiny_llama, stop=list(range(256)))
    result = engine.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=12, esamp=esamp(), check_every=1))
    assert all(s.token_ids == [] and s.finish_reason == "stop" for p in result.prompts for s in p.samples)
    assert result.adapter_stats.updates == 0 and result.steps <= 1


def test_greedy_left_padding_matches_unpadded_generation(tiny_lm):
    engine = engine_for(tiny_lm)
    settings = DecodeSettings(n=1, max_new_tokens=12, sampling=SamplingParams(temperature=0.0, min_p=0.0))
    batched = tokens(engine.generate(PROMPTS, settings))
    alone = [tokens(engine.generate([p], settings))[0] for p in PROMPTS]
    assert batched == alone


def test_prompts_are_reported_as_they_finish_with_all_samples(tiny_llama):
    engine = engine_for(tiny_llama)
    seen = []
    result = engine.generate(PROMPTS, DecodeSettings(n=3, max_new_tokens=9, check_every=4),
                             on_prompt_done=lambda r: seen.append(r.prompt_index))
    assert sorted(seen) == [0, 1, 2] and len(result.prompts) == 3
    assert all(len(p.samples) == 3 for p in result.prompts)
    assert all(len(s.token_ids) <= 9 for p in result.prompts for s in p.samples)
    assert result.tokens_generated == sum(len(t) for t in tokens(result))


@pytest.mark.parametrize("kind", ENGINES)
def test_a_non_finite_row_is_dropped_and_its_prompt_keeps_learning(tiny_llama, kind):
    """Row 0's hidden state turns NaN: its Distiller still learns from row 1, and row 0 ends 'nonfinite'."""
    engine = make_engine(kind, tiny_llama, sites=SitePair(), stop_token_ids=[255], pad_token_id=0)
    layer0 = tiny_llama.model.layers[0]

    def poison(_m, _i, output):
        out = output.clone()
        if out.shape[1] == 1:  # decode steps only
            out[0, -1, 0] = float("nan")
        return out

    handle = layer0.register_forward_hook(poison)
    try:
        result = engine.generate([PROMPTS[0]], DecodeSettings(n=2, max_new_tokens=6, ignore_eos=True,
                                                              esamp=esamp(update_mode="sync")))
    finally:
        handle.remove()
    stats = result.adapter_stats
    assert stats.updates == 5 and stats.skipped_nonfinite == 0
    assert all(math.isfinite(x) for x in stats.loss_per_step + stats.relative_error_per_step)
    poisoned, clean = result.prompts[0].samples
    assert poisoned.finish_reason == "nonfinite" and len(poisoned.token_ids) == 1  # the prefill's token only
    assert clean.finish_reason == "length" and len(clean.token_ids) == 6
    assert result.nonfinite_rows == 1 and math.isfinite(poisoned.perplexity)


def _nan_logits_after(engine, calls: int, row: int) -> None:
    """From the (calls + 1)-th model forward on, row ``row``'s logits are NaN (the LM itself broke)."""
    forward, seen = engine._forward, []

    def broken(*args):
        logits = forward(*args)
        seen.append(True)
        if len(seen) > calls:
            logits = logits.clone()
            logits[row] = float("nan")
        return logits
    engine._forward = broken


@pytest.mark.parametrize("kind", ENGINES)
def test_nan_lm_logits_end_the_row_as_nonfinite_instead_of_emitting_token_zero(tiny_llama, kind):
    common = dict(sites=SitePair(), stop_token_ids=[2], pad_token_id=0)
    settings = DecodeSettings(n=2, max_new_tokens=8, seed=3, ignore_eos=True, sampling=SamplingParams(min_p=0.1))
    clean = make_engine(kind, tiny_llama, **common).generate(PROMPTS, settings)
    engine = make_engine(kind, tiny_llama, **common)
    _nan_logits_after(engine, calls=3, row=1)  # the prefill and two decode steps are fine
    result = engine.generate(PROMPTS, settings)
    got, want = tokens(result), tokens(clean)
    assert got[1] == want[1][:3]
    assert [t for i, t in enumerate(got) if i != 1] == [t for i, t in enumerate(want) if i != 1]
    reasons = [s.finish_reason for p in result.prompts for s in p.samples]
    assert reasons[1] == "nonfinite" and set(reasons[:1] + reasons[2:]) == {"length"}
    assert result.nonfinite_rows == 1 and result.tokens_generated == clean.tokens_generated - 5
    assert math.isfinite(result.prompts[0].samples[1].perplexity)


def test_left_pad_and_bad_settings():
    ids, mask = left_pad([[1, 2], [3]], pad_id=0, device="cpu")
    assert ids.tolist() == [[1, 2], [0, 3]] and mask.tolist() == [[1, 1], [0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0, "cpu")
    with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be an integer >= 1, but is 0"):
        DecodeSettings(n=0)
    for beta in (-0.1, math.inf, math.nan, -math.inf, True):
        with pytest.raises(ValueError, match=f"esamp.beta must be a float >= 0 and finite .*, but is {beta!r}"):
            esamp(beta=beta)


def test_sharpen_only_control_equals_plain_sampling_at_lower_temperature(tiny_llama):
    # (1 + beta) * l sampled at T is l sampled at T / (1 + beta), over the same candidates.
    engine = engine_for(tiny_llama)
    sharpen = ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8)), beta=0.25, mode="sharpen_only")
    torch.manual_seed(0)
    logits = torch.randn(512, 256) * 2
    uniform = torch.rand(512)
    sampling = SamplingParams(top_k=5, min_p=0.0)
    step = ESampStep(sharpen, sampling, engine.head, num_prompts=512, samples_per_prompt=1, max_steps=1, seed=0,
                     device=engine.device)
    a = choose_token(logits, sampling, uniform, esamp=step)
    b = choose_token(logits, SamplingParams(top_k=5, min_p=0.0, temperature=0.8), uniform)
    assert (a == b).float().mean() > 0.99  # equal up to float rounding at CDF boundaries
    result = engine.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=4, esamp=sharpen))
    assert result.adapter_stats is None


@pytest.mark.parametrize("kind", ["eager", "static"])
def test_in_loop_perplexity_equals_a_scoring_pass_under_the_model(tiny_lm, kind):
    """The perplexity the loop sums on the fly is the LM's (T = 1, unfiltered, not ESamp's fused one)."""
    from esamp_pl.evaluation.metrics import perplexities_from_ids
    from esamp_pl.static_engine import make_engine

    engine = make_engine(kind, tiny_lm, sites=SitePair(), stop_token_ids=[2], pad_token_id=0)
    settings = DecodeSettings(n=2, max_new_tokens=12, seed=5, esamp=esamp(beta=0.5),
                              sampling=SamplingParams(temperature=0.8, min_p=0.05))
    result = engine.generate(PROMPTS, settings)
    samples = [(p.prompt_index, s) for p in result.prompts for s in p.samples]
    assert any(s.token_ids for _, s in samples)
    scored = perplexities_from_ids(tiny_lm, [PROMPTS[i] for i, _ in samples], [s.token_ids for _, s in samples])
    for (_, sample), reference in zip(samples, scored):
        if sample.token_ids:
            assert sample.perplexity == pytest.approx(reference, rel=1e-4)
        else:
            assert math.isnan(sample.perplexity)
