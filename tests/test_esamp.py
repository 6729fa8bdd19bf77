"""The ESamp object: its scores are the spec's formula, and the updater decides what a prediction keeps."""

import pytest
import torch

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.esamp import ESampSettings, ESampStep
from esamp_pl.sampling import SamplingParams, select_candidates
from esamp_pl.sites import OutputHead
from tests.conftest import tiny_model

PROMPTS, N = 2, 3


def step_for(model, sampling=SamplingParams(top_k=8, min_p=0.0), **settings):
    adapter = {k: settings.pop(k) for k in ("update_mode", "update_every") if k in settings}
    esamp = ESampSettings(AdapterSpec(DistillerSpec(hidden_size=64, rank=8), **adapter), **settings)
    return ESampStep(esamp, sampling, OutputHead(model), num_prompts=PROMPTS, samples_per_prompt=N, max_steps=4,
                     seed=0, device=torch.device("cpu"))


def step_inputs(sampling=SamplingParams(top_k=8, min_p=0.0)):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(PROMPTS * N, 256, generator=gen) * 3
    source, target = torch.randn(2, PROMPTS * N, 64, generator=gen)
    return select_candidates(logits, sampling), source, target, torch.ones(PROMPTS * N, dtype=torch.bool)


@pytest.mark.parametrize("beta", [0.25, 1.0])
def test_scores_are_the_fusion_of_the_lm_and_the_distillers_logits(tiny_llama, beta):
    step = step_for(tiny_llama, beta=beta, update_mode="sync")
    candidates, source, target, active = step_inputs()
    scores = step.scores(candidates, source, target, active)
    head = tiny_llama.get_output_embeddings().weight
    distiller = (step.prediction @ head.T).gather(1, candidates.token_ids)  # the full head, then the candidates
    torch.testing.assert_close(scores, (1 + beta) * candidates.logits - beta * distiller)
    assert step.prediction.shape == source.shape


def test_beta_zero_scores_are_the_lm_logits_and_the_distillers_still_learn(tiny_llama):
    step = step_for(tiny_llama, beta=0.0, update_mode="sync")
    candidates, source, target, active = step_inputs()
    assert torch.equal(step.scores(candidates, source, target, active), candidates.logits)
    step.after_sampling(source, target, active)
    step.close()
    assert step.stats().updates == PROMPTS  # one step per prompt's Distiller


def test_sharpen_only_scales_the_lm_logits_and_has_no_distiller(tiny_llama):
    step = step_for(tiny_llama, beta=0.25, mode="sharpen_only")
    candidates, source, target, active = step_inputs()
    torch.testing.assert_close(step.scores(candidates, source, target, active), 1.25 * candidates.logits)
    assert step.prediction is None and step.stats() is None and step.updater is None and step.update_label == ""


@pytest.mark.parametrize(("update_every", "keeps"), [(1, True), (3, False)])
def test_the_updater_decides_whether_a_prediction_keeps_its_activations(tiny_llama, update_every, keeps):
    step = step_for(tiny_llama, update_mode="sync", update_every=update_every)
    candidates, source, target, active = step_inputs()
    step.scores(candidates, source, target, active)
    assert step.adapter.keeps_activations is keeps and (step.adapter._pending is not None) is keeps
    for _ in range(update_every):
        step.before_prediction()
        step.scores(candidates, source, target, active)
        step.after_sampling(source, target, active)
    step.close()
    assert step.stats().updates == PROMPTS  # one update per Distiller: every step (k = 1), or one block of 3
