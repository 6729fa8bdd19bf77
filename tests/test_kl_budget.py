import math

import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl import settings as settings_lib
from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings
from esamp_pl.kl_budget import BetaRecorder, candidate_kl, solve_beta
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import StaticDecodeEngine
from tests.conftest import tiny_model

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [20]]
SAMPLING = SamplingParams(max_candidates=256, min_p=0.02)  # several candidates per row on the tiny model


def random_rows(rows=300, k=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lm = torch.randn(rows, k, generator=gen) * 3
    distiller = lm + torch.randn(rows, k, generator=gen) * 2
    keep = torch.rand(rows, k, generator=gen) < 0.6
    keep[:, 0] = True
    return lm, distiller, keep


def reference_kl(lm, distiller, keep, beta, temperature=1.0):
    """KL(pi_new || pi_ref) per row, in float64 and one row at a time."""
    out = []
    for row in range(lm.shape[0]):
        l, d = lm[row, keep[row]].double(), distiller[row, keep[row]].double()
        b = float(beta[row]) if torch.is_tensor(beta) else beta
        log_ref = torch.log_softmax(l / temperature, 0)
        log_new = torch.log_softmax(((1 + b) * l - b * d) / temperature, 0)
        out.append(float((log_new.exp() * (log_new - log_ref)).sum()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("budget", [0.001, 0.05, 0.5])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_solver_meets_the_budget_on_random_rows(budget, temperature):
    lm, distiller, keep = random_rows()
    beta_max = 50.0
    beta, kl = solve_beta(lm, distiller, keep, budget=budget, beta_max=beta_max, temperature=temperature)
    assert ((beta >= 0) & (beta <= beta_max)).all()
    realised = reference_kl(lm, distiller, keep, beta, temperature)
    torch.testing.assert_close(kl.double(), realised, atol=2e-5, rtol=1e-4)
    inside = beta < beta_max
    several = keep.sum(-1) > 1
    assert (inside & several).sum() > 250  # nearly every row is solved inside the bracket
    torch.testing.assert_close(realised[inside & several], torch.full_like(realised[inside & several], budget),
                               atol=2e-5, rtol=1e-4)


def test_kl_grows_with_beta_and_candidate_kl_matches_the_reference():
    lm, distiller, keep = random_rows(rows=50)
    previous = torch.zeros(50, dtype=torch.float64)
    for beta in (0.0, 0.1, 0.3, 1.0, 3.0):
        fused = (1 + beta) * lm - beta * distiller
        kl = candidate_kl(fused, lm, keep)
        reference = reference_kl(lm, distiller, keep, beta)
        torch.testing.assert_close(kl.double(), reference, atol=1e-5, rtol=1e-4)
        assert (reference >= previous - 1e-9).all()
        previous = reference
    assert (candidate_kl(lm, lm, keep) == 0).all()


def test_beta_max_is_respected_and_taken_when_the_budget_cannot_be_met():
    lm, distiller, keep = random_rows(rows=100)
    beta_max = 0.2
    kl_at_max = reference_kl(lm, distiller, keep, beta_max)
    budget = float(kl_at_max.median())  # about half the rows cannot reach it
    beta, kl = solve_beta(lm, distiller, keep, budget=budget, beta_max=beta_max)
    short = kl_at_max < budget
    assert short.sum() >= 40 and (~short).sum() >= 40
    assert (beta[short] == beta_max).all()
    assert (beta <= beta_max).all()
    torch.testing.assert_close(kl[~short].double(), torch.full(((~short).sum(),), budget, dtype=torch.float64),
                               atol=2e-5, rtol=1e-4)


def test_budget_zero_gives_beta_zero_and_single_candidates_take_beta_max():
    lm, distiller, keep = random_rows(rows=40)
    beta, kl = solve_beta(lm, distiller, keep, budget=0.0, beta_max=2.0)
    assert (beta == 0).all() and (kl == 0).all()
    single = torch.zeros_like(keep)
    single[:, 0] = True
    beta, kl = solve_beta(lm, distiller, single, budget=0.1, beta_max=2.0)
    assert (beta == 2.0).all() and (kl.abs() < 1e-7).all()
    broken = distiller.clone()
    broken[3, 0] = math.nan
    beta, _ = solve_beta(lm, broken, keep, budget=0.1, beta_max=2.0)
    assert beta[3] == 0 and (beta[:3] > 0).all()


def test_recorder_summarises_the_counted_row_steps():
    recorder = BetaRecorder(rows=3, max_steps=4, budget=0.1, beta_max=2.0)
    recorder.record(torch.tensor([0.5, 2.0, 9.0]), torch.tensor([0.1, 0.05, 9.0]), torch.tensor([True, True, False]))
    recorder.record(torch.tensor([1.0, 1.5, 9.0]), torch.tensor([0.1, 0.1, 9.0]), torch.tensor([True, True, False]))
    stats = recorder.stats()
    assert stats.row_steps == 4 and stats.beta_mean == pytest.approx(1.25) and stats.at_beta_max == 0.25
    assert stats.kl_mean == pytest.approx(0.0875) and stats.beta_quantiles["q50"] == pytest.approx(1.25)
    recorder.reset()
    assert recorder.stats().row_steps == 0 and recorder.stats().as_dict()["beta_mean"] is None


def esamp(kl_budget, mode="esamp", update_mode="sync", **extra):
    return ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode=update_mode), beta=0.25,
                         mode=mode, kl_budget=kl_budget, **extra)


def engines(model):
    common = dict(sites=SitePair(), stop_token_ids=[255], pad_token_id=0)
    return DecodeEngine(model, **common), StaticDecodeEngine(model, **common)


def tokens(result):
    return [s.token_ids for p in result.prompts for s in p.samples]


def test_budget_zero_gives_plain_sampling_tokens(tiny_llama):
    eager, static = engines(tiny_llama)
    base = DecodeSettings(n=3, max_new_tokens=16, seed=2, sampling=SAMPLING)
    plain = tokens(eager.generate(PROMPTS, base))
    zero = DecodeSettings(n=3, max_new_tokens=16, seed=2, sampling=SAMPLING, esamp=esamp(0.0))
    for engine in (eager, static):
        result = engine.generate(PROMPTS, zero)
        assert tokens(result) == plain
        assert result.kl_budget.beta_mean == 0 and result.kl_budget.row_steps > 0
        assert result.adapter_stats.updates > 0


@pytest.mark.parametrize("mode", ["esamp", "sharpen_only"])
def test_static_gives_the_eager_tokens_with_a_budget_and_spends_it(tiny_lm, mode):
    eager, static = engines(tiny_lm)
    settings = DecodeSettings(n=3, max_new_tokens=16, seed=5, sampling=SAMPLING, esamp=esamp(0.05, mode=mode))
    a, b = eager.generate(PROMPTS, settings), static.generate(PROMPTS, settings)
    assert tokens(a) == tokens(b)
    assert a.kl_budget.row_steps == b.kl_budget.row_steps > 20
    assert b.kl_budget.beta_mean == pytest.approx(a.kl_budget.beta_mean, rel=1e-4)
    stats = a.kl_budget
    assert 0 < stats.beta_quantiles["q10"] <= stats.beta_quantiles["q50"] <= stats.beta_quantiles["q90"] <= 2.0
    # Every counted row-step spends the budget unless it hit beta_max.
    assert stats.kl_mean == pytest.approx(0.05 * (1 - stats.at_beta_max), abs=0.05 * stats.at_beta_max + 1e-4)
    fixed = DecodeSettings(n=3, max_new_tokens=16, seed=5, sampling=SAMPLING, esamp=esamp(None, mode=mode))
    assert tokens(eager.generate(PROMPTS, fixed)) != tokens(a)
    assert eager.generate(PROMPTS, fixed).kl_budget is None


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, True, "0.1"])
def test_bad_budget_values_are_refused(bad):
    with pytest.raises(ValueError, match="esamp.kl_budget must be null"):
        esamp(bad)
    with pytest.raises(ValueError, match="esamp.beta_max must be a finite float > 0"):
        esamp(0.1, beta_max=0.0 if bad != "0.1" else "2")


def test_config_keys_reach_the_settings():
    cfg = OmegaConf.load("conf/esamp/paper.yaml")
    assert cfg.kl_budget is None and cfg.beta_max == 2.0
    cfg.kl_budget = 0.05
    distiller = OmegaConf.load("conf/distiller/default.yaml")
    settings = settings_lib.esamp_settings(cfg, distiller, hidden_size=64)
    assert settings.kl_budget == 0.05 and settings.beta_max == 2.0
    cfg.beta_max = -1.0
    with pytest.raises(ValueError, match="esamp.beta_max"):
        settings_lib.esamp_settings(cfg, distiller, hidden_size=64)


def test_run_summary_reports_the_realised_beta(tiny_llama):
    from esamp_pl.generation import run_summary, summary_line

    eager, _ = engines(tiny_llama)
    settings = DecodeSettings(n=2, max_new_tokens=8, seed=1, sampling=SAMPLING, esamp=esamp(0.05))
    result = eager.generate(PROMPTS, settings)
    summary = run_summary(OmegaConf.create({"n": 2}), result, interrupted=False, load_seconds=0.0)
    realised = summary["kl_budget"]
    assert realised["budget"] == 0.05 and realised["row_steps"] == result.kl_budget.row_steps > 0
    assert realised["beta_q10"] <= realised["beta_q50"] <= realised["beta_q90"] <= realised["beta_max"]
    assert '"kl_budget"' in summary_line(summary)
    plain = run_summary(OmegaConf.create({"n": 2}), eager.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=4)),
                        interrupted=False, load_seconds=0.0)
    assert "kl_budget" not in plain


def test_a_static_step_with_a_budget_never_reads_a_device_value_on_the_host(tiny_llama,
                                                                          forbid_host_reads_in_static_step):
    _, static = engines(tiny_llama)
    static.fixed_candidates = True
    result = static.generate(PROMPTS, DecodeSettings(n=2, max_new_tokens=10, sampling=SAMPLING, esamp=esamp(0.05)))
    assert result.steps == 9 and result.kl_budget.row_steps > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("update_mode", ["sync", "async"])
def test_cuda_graph_replay_with_a_budget_equals_eager(update_mode):
    model = tiny_model("llama").cuda()
    common = dict(sites=SitePair(), stop_token_ids=[255], pad_token_id=0)
    graphed, plain = StaticDecodeEngine(model, **common), StaticDecodeEngine(model, **common, cuda_graphs=False)
    settings = DecodeSettings(n=3, max_new_tokens=16, seed=2, sampling=SAMPLING,
                              esamp=esamp(0.05, update_mode=update_mode))
    replayed = graphed.generate(PROMPTS, settings)
    assert replayed.mode.startswith("static, cuda graphs"), replayed.mode
    reference = plain.generate(PROMPTS, settings)
    assert tokens(replayed) == tokens(reference)
    assert replayed.kl_budget.row_steps == reference.kl_budget.row_steps > 0
    assert replayed.kl_budget.beta_mean == pytest.approx(reference.kl_budget.beta_mean, rel=1e-4)
    again = graphed.generate(PROMPTS, settings)  # replayed graphs, restarted recorder
    assert tokens(again) == tokens(replayed) and again.kl_budget == replayed.kl_budget
