import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeEngine, DecodeSettings, ESampSettings, StepObservation
from esamp_pl.kl_budget import candidate_kl
from esamp_pl.novelty import (NoveltyProbe, _variants, average_ranks, mean_and_se, parse_init, run_diagnostic,
                              spearman)
from esamp_pl.optim import AdamSpec
from esamp_pl.sampling import CandidateSet, SamplingParams
from esamp_pl.sites import SitePair
from tests.conftest import tiny_model


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]
    assert average_ranks(torch.tensor([7.0, 7.0, 7.0])).tolist() == [2.0, 2.0, 2.0]


def test_spearman_against_hand_computations():
    # No ties: 1 - 6 sum d^2 / (n (n^2 - 1)) with d = [-1, 1, -1, 1, 0]: 1 - 24 / 120.
    x, y = torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([2.0, 1, 4, 3, 5])
    assert spearman(x, y) == pytest.approx(0.8)
    assert spearman(x, -x) == pytest.approx(-1.0)
    # Ties: ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]; Pearson of the ranks = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10).
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([10.0, 30, 20, 40])) == pytest.approx(3 / math.sqrt(10))
    assert spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])) is None  # a constant side
    assert spearman(torch.tensor([1.0, 2]), torch.tensor([2.0, 1])) is None  # too few pairs
    with pytest.raises(ValueError, match="pairs"):
        spearman(torch.tensor([1.0, 2, 3]), torch.tensor([1.0, 2]))


def test_mean_and_se():
    mean, se = mean_and_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert math.isnan(mean_and_se([1.0])[1]) and math.isnan(mean_and_se([])[0])


def observation(step, target, error, active, scores=None):
    """A step of one prompt with len(target) rows; prediction = target * (1 - error): signal = error^2."""
    rows = target.shape[0]
    lm = torch.tensor([[2.0, 1.0, 0.0]]).repeat(rows, 1)
    candidates = CandidateSet(token_ids=torch.arange(3).repeat(rows, 1), logits=lm,
                              keep=torch.tensor([[True, True, False]]).repeat(rows, 1))
    return StepObservation(step=step, source=target, target=target, prediction=target * (1 - error.unsqueeze(-1)),
                           candidates=candidates, scores=lm if scores is None else scores, active=active)


def test_probe_novelty_memory_signal_and_tilt():
    e = torch.eye(4)
    probe = NoveltyProbe(num_prompts=1, n=4)
    everyone = torch.ones(4, dtype=torch.bool)
    probe(observation(1, 3 * e, torch.zeros(4), everyone))  # memory: e1..e4 (scaled: cos ignores the norm)
    assert probe.prompts[0].signals == []  # no earlier step: novelty undefined
    target = torch.stack([e[0], (e[0] + e[1]), -e[2], e[3]])
    error = torch.tensor([0.1, 0.2, 0.3, 0.9])
    tilted = torch.tensor([[2.5, 0.5, 9.0]]).repeat(4, 1)
    probe(observation(2, target, error, torch.tensor([True, True, True, False]), scores=tilted))
    trace = probe.prompts[0]
    torch.testing.assert_close(trace.novelties[0], torch.tensor([0.0, 1 - 1 / math.sqrt(2), 1.0]))
    torch.testing.assert_close(trace.signals[0], error[:3] ** 2)
    assert trace.step_correlations == [pytest.approx(1.0)]
    # relative signal ||e_i - mean e||^2 / ||h_i||^2 (by hand: e_i = error_i * h_i, mean (0.1, 1/15, -0.1, 0)):
    # 0.0144, 0.0189, 0.0544, in the order of the novelties
    assert trace.relative_correlations == [pytest.approx(1.0)]
    assert len(trace.memory) == 2 and trace.memory[1].shape == (3, 4)  # the inactive row is not remembered
    summary = probe.summary()
    assert summary["spearman"] == pytest.approx(1.0) and summary["prompts_counted"] == 1
    # Step 1 spent nothing; step 2 tilts [2, 1] to [2.5, 0.5] on the candidates (the third is not one).
    kl_step2 = candidate_kl(tilted[:1], torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[True, True, False]]))
    assert summary["kl_per_step"] == pytest.approx(float(kl_step2) * 3 / 7)
    assert summary["abs_dlogit"] == pytest.approx(0.5 * 3 / 7)


def test_relative_signal_is_the_error_minus_the_prompts_mean_error():
    """Against a direct computation: 2 prompts x 5 rows, one row finished, random states."""
    g = torch.Generator().manual_seed(3)
    probe = NoveltyProbe(num_prompts=2, n=5)
    first = torch.randn(10, 6, generator=g)
    probe(observation(1, first, torch.zeros(10), torch.ones(10, dtype=torch.bool)))  # the memory
    target, prediction = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    active = torch.ones(10, dtype=torch.bool)
    active[7] = False
    step = observation(2, target, torch.zeros(10), active)
    probe(dataclasses.replace(step, prediction=prediction))
    for p in range(2):
        rows = [r for r in range(5 * p, 5 * p + 5) if active[r]]
        error = target[rows] - prediction[rows]
        relative = (error - error.mean(0)).pow(2).sum(-1) / target[rows].pow(2).sum(-1)
        unit = torch.nn.functional.normalize
        memory = unit(first[5 * p:5 * p + 5], dim=-1)
        novelty = 1 - (unit(target[rows], dim=-1) @ memory.T).max(-1).values
        assert probe.prompts[p].relative_correlations == [pytest.approx(spearman(relative, novelty))]
        plain = spearman(error.pow(2).sum(-1) / target[rows].pow(2).sum(-1), novelty)
        assert probe.prompts[p].step_correlations == [pytest.approx(plain)]
    summary = probe.summary()
    per_prompt = [t.relative_correlations[0] for t in probe.prompts]
    assert summary["spearman_relative"] == pytest.approx(sum(per_prompt) / 2)


LOOP, CUE = 200, 5


def looping_model():
    """A tiny LM with a planted repetition: after the cue token some rows fall into a self-loop (they repeat
    one state: novelty 0) while the others wander over the vocabulary (new states)."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()  # no context: a position's states depend on its token only
        model.model.layers[0].mlp.down_proj.weight.zero_()  # source s = the token's embedding
        model.model.layers[1].mlp.down_proj.weight.mul_(3.0)  # target h: a nonlinear map of s, to be learned
        h = model.model(input_ids=torch.arange(256).unsqueeze(1)).last_hidden_state[:, -1]
        head = model.lm_head.weight
        head.mul_(0.05)  # near-uniform next token: rows wander
        head[LOOP] = 1.5 * h[LOOP] / h[LOOP].norm() + math.log(255) * h[CUE] / h[CUE].pow(2).sum()
    return model


def test_planted_repetition_gives_a_positive_correlation_only_when_the_distiller_learns():
    engine = DecodeEngine(looping_model(), sites=SitePair(), stop_token_ids=[255], pad_token_id=0)
    prompts = [[1, 2, CUE], [3, 4, CUE], [6, 7, 8, CUE], [9, CUE]]
    summaries = {}
    for learn in (True, False):
        spec = AdapterSpec(DistillerSpec(hidden_size=64, rank=8), update_mode="sync", learn=learn,
                           optimizer=AdamSpec(lr=3e-2))
        settings = DecodeSettings(n=8, max_new_tokens=16, seed=0, esamp=ESampSettings(spec, beta=0.0),
                                  sampling=SamplingParams(min_p=0.0, max_candidates=256))
        probe = NoveltyProbe(len(prompts), 8)
        result = engine.generate(prompts, settings, observer=probe)
        assert any(s.token_ids[0] == LOOP for p in result.prompts for s in p.samples)
        signal = torch.cat([s for trace in probe.prompts for s in trace.signals])
        novelty = torch.cat([s for trace in probe.prompts for s in trace.novelties])
        repeats = novelty < 1e-4
        assert 50 < repeats.sum() < repeats.numel() - 50
        summaries[learn] = probe.summary(), signal[repeats].mean() / signal[~repeats].mean()
    (learned, learned_ratio), (frozen, frozen_ratio) = summaries[True], summaries[False]
    # Trained on the repeated states, the Distiller errs less on them: signal rises with novelty.
    assert learned_ratio < 0.75 and frozen_ratio > 0.9
    assert learned["spearman"] > 0.2 and learned["spearman"] > 2 * learned["spearman_se"]
    assert learned["spearman_pooled"] > 0.2
    assert abs(frozen["spearman"]) < 0.15 and learned["spearman"] - frozen["spearman"] > 0.25


def test_init_names_and_variants_are_validated():
    assert parse_init("warm") == ("warm", True) and parse_init("frozen_svd") == ("svd", False)
    with pytest.raises(ValueError, match="unknown init 'frozen_best'"):
        parse_init("frozen_best")
    cfg = OmegaConf.create({"betas": [0.0, 0.25], "kl_budgets": [0.05]})
    assert [label for label, _ in _variants(cfg)] == ["beta0", "beta0.25", "kl0.05"]
    with pytest.raises(ValueError, match="betas"):
        _variants(OmegaConf.create({"betas": [-1.0]}))


def test_run_diagnostic_refuses_bad_settings_before_loading_a_model(tmp_path):
    cfg = OmegaConf.load("conf/diagnose.yaml")
    cfg.merge_with(OmegaConf.create({
        "model": OmegaConf.load("conf/model/smollm2-135m.yaml"), "sampling": OmegaConf.load("conf/sampling/min_p.yaml"),
        "esamp": OmegaConf.load("conf/esamp/paper.yaml"), "distiller": OmegaConf.load("conf/distiller/default.yaml"),
        "output_dir": str(tmp_path)}))
    del cfg["defaults"], cfg["hydra"]
    bad = cfg.copy()
    bad.inits = ["random", "best"]
    with pytest.raises(ValueError, match="unknown init 'best'"):
        run_diagnostic(bad)
    sharpen = cfg.copy()
    sharpen.esamp.mode = "sharpen_only"
    with pytest.raises(ValueError, match="needs ESamp with a Distiller"):
        run_diagnostic(sharpen)
    assert list(tmp_path.iterdir()) == []


def test_report_pairs_each_init_with_random_and_its_frozen_twin():
    from esamp_pl.novelty import _report, format_table

    def record(per_prompt, tokens="same"):
        return {"per_prompt": [{"spearman": v} for v in per_prompt], "spearman": sum(per_prompt) / len(per_prompt),
                "spearman_se": 0.0, "spearman_pooled": 0.5, "spearman_pooled_se": math.nan, "kl_per_step": 0.0,
                "abs_dlogit": 0.0, "updates": 3, "tokens_sha256": tokens}

    runs = {"beta0": {"random": record([0.1, 0.2, 0.0]), "warm": record([0.4, 0.6, 0.5]),
                      "frozen_warm": record([0.2, 0.2, 0.2])},
            "beta0.25": {"random": record([0.1, 0.1, 0.1], "x"), "warm": record([0.3, 0.3, 0.3], "y")}}
    cfg = OmegaConf.create({"model": {"name": "tiny"}, "sampling": {"min_p": 0.1}})
    decode = DecodeSettings(n=4, max_new_tokens=8)
    report = _report(cfg, ["a", "b", "c"], decode, [("beta0", {"beta": 0.0}), ("beta0.25", {"beta": 0.25})], runs)
    warm = report["inits"]["warm"]
    assert warm["spearman_minus_random"] == pytest.approx(0.4)  # [0.3, 0.4, 0.5]
    assert warm["spearman_minus_random_se"] == pytest.approx(0.1 / math.sqrt(3))
    assert warm["spearman_minus_frozen"] == pytest.approx(0.3)  # [0.2, 0.4, 0.3]
    assert warm["spearman_pooled_se"] is None  # nan becomes null (JSON)
    assert "spearman_minus_random" not in report["inits"]["random"]
    assert report["inits"]["warm@beta0.25"]["spearman_minus_random"] == pytest.approx(0.2)
    assert report["same_tokens"] == {"beta0": True, "beta0.25": False}
    assert format_table(report).count("\n") == 2 + 5 - 1
