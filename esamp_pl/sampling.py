"""Filters, ESamp fusion and sampling, all inside the candidate set.

Order (the same as Hugging Face's logits warpers): temperature, then top-k, then top-p, then
min-p; each later filter sees the distribution renormalised over what the earlier ones kept. The
tokens that survive form the candidate set C. ESamp never adds a token outside C: it only
re-weights C with ``(1 + beta) * l - beta * d`` (spec Eq. 7), then samples from
``softmax(new / T)`` over C (greedy: argmax of ``new`` over C).

Every filter keeps the highest-logit tokens, so C is always a prefix of the tokens sorted by the
LM's logits. The work therefore happens in a *candidate space*, the top tokens by logit:

* widened on demand (``exact=True``, the eager engine and any CPU run): the top ``max_candidates``
  first; a row whose C fills it is searched again in a space ``WIDENING`` times wider, up to the whole
  vocabulary (a full sort of one row costs as much as ~25 top-64 searches); then narrowed to the next
  power of two that holds every row's C (ESamp's per-candidate work shrinks with it);
* sized from the configuration (``exact=False``, fixed shapes for CUDA graphs, no host read):
  ``top_k + TIE_ROOM`` tokens when top-k bounds C, else the whole vocabulary (no other filter
  bounds C: a flat distribution keeps every token under min-p or top-p). Only more than
  ``TIE_ROOM`` tokens tied with the k-th logit can overflow it; such rows are counted.

top-k keeps every token tied with the k-th logit, as Hugging Face's ``TopKLogitsWarper`` does.

Sampling is inverse-CDF over the candidate probabilities (in vocabulary order) with one uniform number
per row, which avoids ``torch.multinomial`` over the full vocabulary (tens of ms per step on a CPU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TIE_ROOM = 64
"slots beyond top_k in a configuration-sized candidate space, for tokens tied with the k-th logit"
WIDENING = 16
"the widening path searches the rows whose set fills the space again in a space this many times wider"


@dataclass(frozen=True)
class SamplingParams:
    """The LM's own sampling settings (the baseline that ESamp re-weights)."""

    temperature: float = 1.0
    "divides the logits; 0 means greedy (argmax); < 1 sharper, > 1 flatter"
    top_k: int = 0
    "keep the k most likely tokens; 0 disables"
    top_p: float = 1.0
    "keep the smallest set whose probability reaches top_p; 1.0 disables"
    min_p: float = 0.1
    "keep tokens whose probability is at least min_p times the top token's; 0 disables"
    max_candidates: int = 64
    "size of the candidate space searched first by the widening path; a larger candidate set widens it (exact)"

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature has to be a finite float >= 0, but is {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k has to be an integer >= 0 (0 disables it), but is {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p has to be a float in the (0, 1] interval, but is {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p has to be a float in the [0, 1] interval, but is {self.min_p}")
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ValueError(f"max_candidates has to be a positive integer, but is {self.max_candidates}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class CandidateSet:
    """The top tokens of each row, sorted by the LM's logit, and which of them survive the filters."""

    token_ids: torch.Tensor  # [rows, k] vocabulary ids, sorted by descending logit
    logits: torch.Tensor  # [rows, k] the LM's raw logits l of those tokens
    keep: torch.Tensor  # [rows, k] bool, the candidate set C (a prefix of each row)
    partial: bool = False
    "the space is narrower than the vocabulary: a row that fills it may have been cut"

    @property
    def size(self) -> torch.Tensor:
        return self.keep.sum(-1)


def _filter_sorted(sorted_logits: torch.Tensor, full_logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Candidate mask over logits sorted in descending order (columns = rank)."""
    temperature = params.temperature if params.temperature > 0 else 1.0
    scaled = sorted_logits.float() / temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if 0 < params.top_k < scaled.shape[-1]:
        # Hugging Face's rule: drop what is below the k-th logit, so tokens tied with it stay.
        keep &= scaled >= scaled[:, params.top_k - 1:params.top_k]
    if params.top_p < 1.0:
        if params.top_k > 0:
            normaliser = torch.logsumexp(scaled.masked_fill(~keep, -math.inf), dim=-1, keepdim=True)
        else:
            normaliser = torch.logsumexp(full_logits.float() / temperature, dim=-1, keepdim=True)
        probs = torch.exp(scaled - normaliser).masked_fill(~keep, 0.0)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        keep &= mass_before < params.top_p
        keep[:, 0] = True
    if params.min_p > 0.0:
        keep &= scaled >= scaled[:, :1] + math.log(params.min_p)
    return keep


def fixed_space_size(params: SamplingParams, vocab: int) -> int:
    """Width of the configuration-sized candidate space (``select_candidates(exact=False)``)."""
    return min(vocab, params.top_k + TIE_ROOM) if params.top_k > 0 else vocab


def select_candidates(logits: torch.Tensor, params: SamplingParams, *, exact: bool = True) -> CandidateSet:
    """Apply the filters to ``logits`` ([rows, vocab]) and return the candidate set.

    ``exact=True`` searches the rows whose set fills the space again in a wider one (``WIDENING`` times, up
    to the vocabulary; one host read per space tried), then narrows the space to the next power of two
    that holds every row's set; nothing of C is ever cut;
    ``exact=False`` uses the space sized from the configuration (:func:`fixed_space_size`: fixed
    shapes, no host synchronisation).
    """
    vocab = logits.shape[-1]
    if exact:
        # top_k + 1: one slot past the k-th shows whether a tie with it runs on.
        k = min(vocab, max(params.max_candidates, params.top_k + 1 if params.top_k > 0 else 0))
    else:
        k = fixed_space_size(params, vocab)
    top_logits, top_ids = torch.topk(logits, k, dim=-1)
    keep = _filter_sorted(top_logits, logits, params)
    if not exact:
        return CandidateSet(token_ids=top_ids, logits=top_logits, keep=keep, partial=k < vocab)
    reach = _reach(keep)
    widened: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    space = k
    # One host read per space tried: does some row's set fill it (then it may go on past it)?
    while (used := int(reach.max())) == space < vocab:
        rows = (reach == space).nonzero().squeeze(1)  # only the rows that fill it are searched further
        space = min(vocab, space * WIDENING)
        row_logits, row_ids = torch.topk(logits[rows], space, dim=-1)
        row_keep = _filter_sorted(row_logits, logits[rows], params)
        widened.append((rows, row_logits, row_ids, row_keep))
        reach = reach.clone()
        reach[rows] = _reach(row_keep)
    # Narrowed to the next power of two that holds every row's set: what follows (ESamp's projection of the
    # candidates, fusion, sampling) costs in proportion to the width, and the columns cut are outside C.
    width = min(space, 1 << max(used - 1, 0).bit_length())
    token_ids, cand_logits, cand_keep = (_to_width(t, width) for t in (top_ids, top_logits, keep))
    for rows, row_logits, row_ids, row_keep in widened:  # later (wider) searches overwrite earlier ones
        token_ids[rows], cand_logits[rows], cand_keep[rows] = (_to_width(t, width) for t in (row_ids, row_logits,
                                                                                           row_keep))
    return CandidateSet(token_ids=token_ids, logits=cand_logits, keep=cand_keep)


def _reach(keep: torch.Tensor) -> torch.Tensor:
    """[rows]: how many leading columns of ``keep`` [rows, k] hold the row's kept candidates."""
    return (keep * torch.arange(1, keep.shape[-1] + 1, device=keep.device)).amax(-1)


def _to_width(values: torch.Tensor, width: int) -> torch.Tensor:
    """``values`` [rows, k] cut or extended to ``width`` columns; added columns repeat the last one (a token
    outside the row's set, with its own logit; ``keep`` False), so a row narrower than the space stays exact."""
    if values.shape[-1] >= width:
        return values[:, :width].clone()
    return torch.cat([values, values[:, -1:].expand(-1, width - values.shape[-1])], dim=-1)


def fuse(lm_logits: torch.Tensor, distiller_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """ESamp's re-weighting ``(1 + beta) * l - beta * d`` (spec Eq. 7).

    Rows where the Distiller's logits are not finite keep the LM's logits unchanged, so a broken
    prediction never reaches sampling.
    """
    fused = (1.0 + beta) * lm_logits - beta * distiller_logits
    usable = torch.isfinite(distiller_logits).all(dim=-1, keepdim=True)
    return torch.where(usable, fused, lm_logits)


def sample_from_candidates(candidates: CandidateSet, scores: torch.Tensor, params: SamplingParams,
                           uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from ``softmax(scores / T)`` restricted to the candidate set.

    ``scores`` are per-candidate logits (the LM's, or ESamp's fused ones), ``uniform`` one number
    in [0, 1) per row. Greedy takes the argmax of ``scores`` over the candidates.
    """
    masked = scores.float().masked_fill(~candidates.keep, -math.inf)
    if params.greedy:
        choice = masked.argmax(dim=-1)
    else:
        # The CDF runs over the candidates in vocabulary order, not logit order: near-tied tokens then
        # cannot swap places under float noise (1e-5 between batch shapes or engines), which would hand a
        # uniform to the other token; in id order such noise only moves a boundary by as much.
        by_id = candidates.token_ids.argsort(dim=-1)
        probs = torch.softmax(masked / params.temperature, dim=-1).gather(1, by_id)
        cdf = torch.cumsum(probs, dim=-1)
        threshold = uniform.unsqueeze(-1) * cdf[:, -1:]
        # The first token whose CDF passes the threshold: its CDF rose, so it has positive probability (a
        # uniform of 0 cannot pick a dropped token). Rounding that lifts the threshold to the total falls back
        # to the last token with positive probability.
        position = (cdf <= threshold).sum(dim=-1, keepdim=True)
        order = torch.arange(probs.shape[-1], device=probs.device)
        last_positive = torch.where(probs > 0, order, 0).amax(dim=-1, keepdim=True)
        position = torch.minimum(position, last_positive)
        choice = by_id.gather(1, position).squeeze(-1)
    return candidates.token_ids.gather(1, choice.unsqueeze(-1)).squeeze(-1)
