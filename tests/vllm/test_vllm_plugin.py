"""ESamp inside vLLM (CPU build, bundled SmolLM2): exactness, captured states, fusion, learning, isolation, memory."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("vllm.sampling_params")  # the real vLLM, not this folder as a namespace package

import torch  # noqa: E402
from vllm import SamplingParams  # noqa: E402

from esamp_pl.sampling import SamplingParams as EsampParams  # noqa: E402
from esamp_pl.sampling import fuse, select_candidates  # noqa: E402
from esamp_pl.vllm.v1_runner import parse_child_id  # noqa: E402

pytestmark = pytest.mark.vllm

PROMPT = "Write a short poem about a lighthouse."


def params(n: int, tokens: int, seed: int, **esamp) -> SamplingParams:
    extra = {f"esamp_{k}": v for k, v in esamp.items()} or None
    return SamplingParams(n=n, max_tokens=tokens, min_p=0.1, seed=seed, ignore_eos=True, extra_args=extra)


def token_lists(output) -> list[list[int]]:
    return [list(c.token_ids) for c in output.outputs]


def group_record(runtime, group: str) -> dict:
    matches = [g for g in runtime.stats()["groups"] if g["group"] == f"group:{group}"]
    assert len(matches) == 1, f"expected one group {group!r}, found {len(matches)}"
    return matches[0]


def test_beta_zero_is_vllms_own_output_and_still_learns(llm, runtime):
    plain, esamp = llm.generate([PROMPT, PROMPT], [params(4, 24, 7), params(4, 24, 7, beta=0.0, group="beta0")],
                                use_tqdm=False)
    assert token_lists(esamp) == token_lists(plain)
    assert len({tuple(t) for t in token_lists(plain)}) > 1  # the seed really samples (not a greedy run)
    record = group_record(runtime, "beta0")
    assert record["updates"] == record["steps"] == 23  # every decode step trained the group's Distiller


def test_esamp_changes_the_draw(llm):
    plain, esamp = llm.generate([PROMPT, PROMPT], [params(4, 24, 7), params(4, 24, 7, beta=0.25)], use_tqdm=False)
    first = [t[0] for t in token_lists(plain)]
    assert [t[0] for t in token_lists(esamp)] == first  # the prefill's token is plain sampling
    assert token_lists(esamp) != token_lists(plain)


@pytest.fixture(scope="module")
def teacher_forced(llm, runtime, hf_model):
    """An ESamp run's recorded decode rows next to the HF model's states and logits for the same tokens."""
    beta = 0.25
    [output] = llm.generate([PROMPT], [params(2, 10, 11, beta=beta, group="states")], use_tqdm=False)
    prompt_ids = list(output.prompt_token_ids)
    records = [r for r in runtime.records if r["group"] == "group:states"]
    assert len(records) == 2 * 9  # 2 samples x 9 decode steps (the first token comes from the prefill)
    hf = {}
    for k, completion in enumerate(output.outputs):
        ids = torch.tensor([prompt_ids + list(completion.token_ids)])
        with torch.no_grad():
            out = hf_model(ids, output_hidden_states=True)
        hf[k] = (out.hidden_states[1][0], out.hidden_states[-1][0], out.logits[0], list(completion.token_ids))
    return records, hf, len(prompt_ids), beta


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_captured_states_equal_hf_hidden_states(teacher_forced):
    records, hf, prompt_len, _ = teacher_forced
    for record in records:
        _, sample = parse_child_id(record["request_id"])
        source, target, _, _ = hf[sample]
        position = prompt_len + record["step"]  # decode step s feeds generated token s
        assert _rel(record["source"], source[position]) < 1e-4
        assert _rel(record["target"], target[position]) < 1e-4


@torch.no_grad()
def test_candidates_and_fused_scores_follow_esamp_pl(teacher_forced, hf_model):
    records, hf, prompt_len, beta = teacher_forced
    head = hf_model.get_output_embeddings().weight
    for record in records:
        _, sample = parse_child_id(record["request_id"])
        _, _, logits, generated = hf[sample]
        position = prompt_len + record["step"]
        candidates = select_candidates(logits[position:position + 1], EsampParams(min_p=0.1))
        expected_ids = candidates.token_ids[0][candidates.keep[0]]
        assert torch.equal(record["candidate_ids"], expected_ids)
        lm = logits[position, expected_ids]
        assert torch.allclose(record["candidate_logits"], lm, atol=2e-3)
        distiller = record["prediction"] @ head[expected_ids].T
        formula = fuse(lm.unsqueeze(0), distiller.unsqueeze(0), beta)[0]
        assert torch.allclose(record["fused"], formula, atol=5e-3)
        assert torch.allclose(record["fused"], (1 + beta) * lm - beta * distiller, atol=5e-3)
        assert generated[record["step"] + 1] in expected_ids.tolist()  # the draw stays inside the candidates


def test_distiller_loss_falls_and_updates_are_counted(llm, runtime):
    llm.generate([PROMPT], [params(4, 40, 3, beta=0.25, group="learn")], use_tqdm=False)
    record = group_record(runtime, "learn")
    losses = record["loss_per_step"]
    assert record["updates"] == record["steps"] == len(losses) == 39 and record["skipped_updates"] == 0
    assert sum(losses[-8:]) / 8 < 0.95 * sum(losses[:4]) / 4  # measured: ~9% lower after 39 steps (random init)


def test_esamp_and_plain_requests_do_not_disturb_each_other(llm):
    other = "Name three colours of the sea."
    plain_alone = llm.generate([other], [params(3, 16, 5)], use_tqdm=False)[0]
    esamp_alone = llm.generate([PROMPT], [params(3, 16, 9, beta=0.25)], use_tqdm=False)[0]
    plain_mixed, esamp_mixed = llm.generate([other, PROMPT], [params(3, 16, 5), params(3, 16, 9, beta=0.25)],
                                            use_tqdm=False)
    assert token_lists(plain_mixed) == token_lists(plain_alone)
    assert token_lists(esamp_mixed) == token_lists(esamp_alone)


def test_finished_groups_free_their_distillers(llm, runtime):
    created_before = runtime.bank.groups_created
    live = []
    for round_ in range(6):
        llm.generate([PROMPT, PROMPT], [params(2, 4, round_, beta=0.25), params(2, 4, 50 + round_, beta=0.25)],
                     use_tqdm=False)
        live.append(runtime.bank.live_distillers)
    assert runtime.bank.groups_created - created_before == 12
    # a group is freed at the engine step after its last member finished: the last round's two stay live
    assert live[1:] == [2] * 5
    assert runtime.bank.groups_created - runtime.bank.groups_freed == runtime.bank.live_distillers
    assert len(runtime.members) <= 4


def test_bad_esamp_keys_are_rejected_before_generation(llm):
    with pytest.raises(Exception, match="esamp_beta"):
        llm.generate([PROMPT], [params(1, 4, 0, beta=-1.0)], use_tqdm=False)
    with pytest.raises(Exception, match="unknown ESamp request key"):
        llm.generate([PROMPT], [SamplingParams(max_tokens=4, extra_args={"esamp_bta": 0.25})], use_tqdm=False)


def test_warm_start_begins_from_the_pretrained_checkpoint(llm, runtime):
    llm.generate([PROMPT, PROMPT, PROMPT],
                 [params(2, 6, 1, beta=0.25, group="init-random"),
                  params(2, 6, 1, beta=0.25, group="init-warm", init="warm"),
                  params(2, 6, 1, beta=0.25, group="init-svd", init="svd")], use_tqdm=False)
    random_, warm, svd = (group_record(runtime, f"init-{kind}") for kind in ("random", "warm", "svd"))
    assert all(math.isfinite(v) for g in (random_, warm, svd) for v in g["loss_per_step"])
    # the pre-trained Distiller predicts the target far better than a random one from the first step on
    assert warm["relative_error_per_step"][0] < 0.5 * random_["relative_error_per_step"][0]
    assert warm["updates"] == random_["updates"] == svd["updates"] == 5
