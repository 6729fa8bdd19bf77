import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.error_signal import prediction_for_fusion
from esamp_pl.sampling import SamplingParams, fuse
from esamp_pl.settings import esamp_settings
from esamp_pl.sites import OutputHead, SitePair
from esamp_pl.static_engine import StaticDecodeEngine
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
STOPS = list(range(30, 40))
EXACT = SamplingParams(max_candidates=256)


def esamp(error="relative", beta=0.5, update_mode="sync"):
    adapter = AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode)
    return ESampSettings(adapter, beta=beta, error=error)


def tokens(result):
    return [s.token_ids for p in result.prompts for s in p.samples]


def test_relative_fusion_tilts_along_the_error_minus_the_prompts_mean(tiny_llama):
    head = OutputHead(tiny_llama)
    torch.manual_seed(0)
    n, beta = 3, 0.4
    target, prediction = torch.randn(6, 64), torch.randn(6, 64)
    active = torch.tensor([True, True, False, True, True, True])  # row 2 (prompt 0) has finished
    ids = torch.randint(0, 256, (6, 10))
    lm = head.logits_at(target, ids)
    fused = fuse(lm, head.logits_at(prediction_for_fusion(prediction, target, active, n, "relative"), ids), beta)

    error = target - prediction
    mean = torch.stack([error[:2].mean(0), error[3:].mean(0)]).repeat_interleave(n, dim=0)  # active rows only
    expected = beta * (error - mean) @ head.weight.T.float()
    torch.testing.assert_close(fused - lm, expected.gather(1, ids), rtol=1e-4, atol=1e-4)
    plain = fuse(lm, head.logits_at(prediction_for_fusion(prediction, target, active, n, "plain"), ids), beta)
    torch.testing.assert_close(plain - lm, (beta * error @ head.weight.T.float()).gather(1, ids),
                               rtol=1e-4, atol=1e-4)


def test_an_error_common_to_all_samples_gives_no_relative_tilt():
    n = 4
    prediction = torch.randn(n, 16)
    target = prediction + torch.randn(1, 16)  # every sample errs in the same direction
    adjusted = prediction_for_fusion(prediction, target, torch.ones(n, dtype=torch.bool), n, "relative")
    torch.testing.assert_close(adjusted, target)  # d' = l: fused logits equal the LM's
    other = prediction + torch.randn(n, 16)
    single = prediction_for_fusion(prediction, other, torch.tensor([True, False, False, False]), n, "relative")
    torch.testing.assert_close(single[0], other[0])  # a lone active row has no siblings: no tilt


def test_a_non_finite_row_stays_non_finite_and_does_not_poison_its_siblings():
    prediction, target = torch.randn(3, 8), torch.randn(3, 8)
    prediction[0] = float("nan")
    adjusted = prediction_for_fusion(prediction, target, torch.ones(3, dtype=torch.bool), 3, "relative")
    assert torch.isnan(adjusted[0]).all() and torch.isfinite(adjusted[1:]).all()
    mean = (target[1:] - prediction[1:]).mean(0)
    torch.testing.assert_close(adjusted[1:], prediction[1:] + mean)


def test_static_engine_gives_the_eager_engines_tokens_with_relative_error(tiny_lm):
    common = dict(sites=SitePair(), stop_token_ids=STOPS, pad_token_id=0)
    eager, static = DecodeEngine(tiny_lm, **common), StaticDecodeEngine(tiny_lm, **common)
    settings = DecodeSettings(n=3, max_new_tokens=20, seed=4, sampling=EXACT, esamp=esamp())
    a, b = eager.generate(PROMPTS, settings), static.generate(PROMPTS, settings)
    assert tokens(a) == tokens(b)
    assert b.adapter_stats.updates == a.adapter_stats.updates > 0
    plain = eager.generate(PROMPTS, DecodeSettings(n=3, max_new_tokens=20, seed=4, sampling=EXACT,
                                                   esamp=esamp(error="plain")))
    assert tokens(plain) != tokens(a)  # the option changes what is sampled


@pytest.mark.parametrize("kind", ["eager", "static"])
def test_relative_error_at_beta_zero_is_plain_sampling(tiny_llama, kind):
    common = dict(sites=SitePair(), stop_token_ids=STOPS, pad_token_id=0)
    engine = (DecodeEngine if kind == "eager" else StaticDecodeEngine)(tiny_llama, **common)
    plain = engine.generate(PROMPTS, DecodeSettings(n=3, max_new_tokens=12, seed=2, sampling=EXACT))
    relative = engine.generate(PROMPTS, DecodeSettings(n=3, max_new_tokens=12, seed=2, sampling=EXACT,
                                                       esamp=esamp(beta=0.0)))
    assert tokens(relative) == tokens(plain)


def test_config_key_reaches_the_settings_and_a_bad_value_names_the_choices():
    distiller = OmegaConf.create({"rank": 8})
    assert esamp_settings(OmegaConf.create({"error": "relative"}), distiller, 64).error == "relative"
    assert esamp_settings(OmegaConf.create({}), distiller, 64).error == "plain"
    with pytest.raises(ValueError, match=r"esamp.error must be one of \('plain', 'relative'\), but is 'mean'"):
        esamp_settings(OmegaConf.create({"error": "mean"}), distiller, 64)
    with pytest.raises(ValueError, match="esamp.error must be one of"):
        prediction_for_fusion(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, dtype=torch.bool), 1, "mean")
