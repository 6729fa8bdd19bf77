"""One ESamp decode step inside vLLM's sampler, independent of vLLM's version.

The vLLM-specific parts (which batch rows are decode rows of which request, where the captured
states are) are resolved by :mod:`esamp_pl.vllm.v1_runner` and the logits processor; this module
gets plain tensors and request ids and runs the own engine's step on them:

1. per group, the Distiller predicts the target from this step's source states (the parameters
   learned up to the previous step);
2. per row, the request's own filters give the candidate set
   (:func:`esamp_pl.sampling.select_candidates`), the fusion ``(1 + beta) l - beta d`` is applied
   to the candidates (:func:`esamp_pl.sampling.fuse`) and one token is drawn
   (:func:`esamp_pl.sampling.sample_from_candidates`) with the request's own random stream;
   the row's logits become that token alone, so vLLM's sampler (its temperature, filters and
   draw) can only return it;
3. per group, one optimizer step on this step's pairs (:meth:`TestTimeAdapter.update`), so the
   update of step t lands before the prediction of step t + 1.

A request with ``esamp_beta = 0`` is predicted and trained on but keeps vLLM's own draw: its
tokens are exactly vLLM's for the same seed.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from esamp_pl.adapter import AdapterSpec, AdapterStats
from esamp_pl.sampling import SamplingParams, fuse, sample_from_candidates, select_candidates
from esamp_pl.sites import OutputHead
from esamp_pl.vllm.groups import GroupBank, merged_stats
from esamp_pl.vllm.options import PluginSettings, RequestOptions

VLLM_SAMPLING_EPS = 1e-5
"vLLM treats a temperature below this as greedy"


def esamp_sampling(temperature: float, top_k: int | None, top_p: float, min_p: float,
                   max_candidates: int) -> SamplingParams:
    """esamp_pl's filter settings for a vLLM request's ``temperature / top_k / top_p / min_p``."""
    return SamplingParams(temperature=0.0 if temperature < VLLM_SAMPLING_EPS else float(temperature),
                          top_k=max(int(top_k or 0), 0), top_p=float(top_p), min_p=float(min_p),
                          max_candidates=max_candidates)


def output_head(weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None) -> OutputHead:
    """esamp_pl's :class:`OutputHead` over vLLM's LM head weights (the Distiller's logits use the same code)."""
    model = SimpleNamespace(get_output_embeddings=lambda: SimpleNamespace(weight=weight, bias=bias),
                            config=SimpleNamespace(final_logit_softcapping=softcap))
    return OutputHead(model)


@dataclass
class Member:
    """A live ESamp request: its switches, filters, random stream and place in its group."""

    request_id: str
    options: RequestOptions
    sampling: SamplingParams
    generator: torch.Generator
    group: str
    slot: int
    "row in the group's Distiller"
    seed: int

    def uniform(self) -> torch.Tensor:
        return torch.rand((), generator=self.generator, device=self.generator.device)


class ESampRuntime:
    """Members, groups and the step; one per vLLM worker process."""

    def __init__(self, settings: PluginSettings, *, head: OutputHead, hidden_size: int,
                 device: torch.device | str, initial_state: Any, logit_scale: float = 1.0) -> None:
        self.settings = settings
        self.head = head
        self.logit_scale = logit_scale
        self.device = torch.device(device)
        self.spec: AdapterSpec = settings.adapter_spec(hidden_size)
        self.bank = GroupBank(self.spec, device=self.device, initial_state=initial_state)
        self.members: dict[str, Member] = {}
        self.records: deque[dict[str, Any]] = deque(maxlen=max(settings.record_steps, 1))
        self.esamp_draws = 0
        "rows whose token was drawn from the fused distribution"
        self.decode_rows = 0
        "ESamp decode rows seen (predicted and trained on)"

    # ---- membership -----------------------------------------------------------------------------------
    def add(self, request_id: str, options: RequestOptions, sampling: SamplingParams, *, seed: int | None,
            group: str, slot: int | None = None, size: int = 1) -> Member:
        if request_id in self.members:
            return self.members[request_id]
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()))  # vLLM's unseeded requests draw from the global stream too
        generator = torch.Generator(device=self.device).manual_seed(seed)
        joined = self.bank.join(group, request_id, slot, size)
        member = Member(request_id, options, sampling, generator, group, joined, seed)
        self.members[request_id] = member
        return member

    def finish(self, request_id: str) -> None:
        member = self.members.pop(request_id, None)
        if member is not None:
            self.bank.leave(member.group, request_id)

    # ---- the decode step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, logits: torch.Tensor, rows: list[tuple[int, str]], source: torch.Tensor,
             target: torch.Tensor) -> None:
        """Run ESamp on ``rows`` ((batch index, request id) of decode rows) and write the draws into ``logits``.

        ``source`` / ``target`` are the captured states of those rows, in the same order.
        """
        members = [self.members[request_id] for _, request_id in rows]
        source = source.float()
        target = target.float()
        self.decode_rows += len(rows)

        # 1. predictions, one Distiller per group
        prediction = torch.empty_like(source)
        plans = []
        by_group: dict[str, list[int]] = defaultdict(list)
        for pos, member in enumerate(members):
            by_group[member.group].append(pos)
        for key, positions in by_group.items():
            first = members[positions[0]]
            adapter = self.bank.adapter(key, first.options.init, first.seed + 1)
            group = self.bank.groups[key]
            where = torch.tensor(positions, device=source.device)
            slots = torch.tensor([members[p].slot for p in positions], device=source.device)
            group_source = source.new_zeros(group.capacity, source.shape[-1]).index_copy_(
                0, slots, source.index_select(0, where))
            prediction.index_copy_(0, where, adapter.predict(group_source).index_select(0, slots))
            plans.append((group, adapter, where, slots))

        # 2. candidates, fusion and the draw, per (filters, beta)
        by_filters: dict[tuple[SamplingParams, float], list[int]] = defaultdict(list)
        for pos, member in enumerate(members):
            by_filters[(member.sampling, float(member.options.beta))].append(pos)
        for (params, beta), positions in by_filters.items():
            if beta == 0 and not self.settings.record_steps:
                continue  # vLLM draws: its own output, token for token
            batch_rows = torch.tensor([rows[p][0] for p in positions], device=logits.device)
            where = torch.tensor(positions, device=source.device)
            row_logits = logits.index_select(0, batch_rows)
            candidates = select_candidates(row_logits, params)
            distiller_logits = self.head.logits_at(prediction.index_select(0, where), candidates.token_ids)
            distiller_logits = distiller_logits.float() * self.logit_scale
            scores = fuse(candidates.logits.float(), distiller_logits, beta)
            if beta > 0:
                uniform = torch.stack([members[p].uniform() for p in positions]).to(logits.device)
                token = sample_from_candidates(candidates, scores, params, uniform)
                logits.index_fill_(0, batch_rows, -math.inf)
                logits.index_put_((batch_rows, token), torch.zeros_like(token, dtype=logits.dtype))
                self.esamp_draws += len(positions)
            if self.settings.record_steps:
                self._record(members, positions, source, target, prediction, candidates, scores, beta)

        # 3. the update of this step, before the next prediction
        for group, adapter, where, slots in plans:
            group_target = target.new_zeros(group.capacity, target.shape[-1]).index_copy_(
                0, slots, target.index_select(0, where))
            active = torch.zeros(group.capacity, dtype=torch.bool, device=target.device)
            active[slots] = True
            adapter.update(group_target, active)
            group.steps += 1

    def _record(self, members, positions, source, target, prediction, candidates, scores, beta) -> None:
        for i, pos in enumerate(positions):
            member = members[pos]
            self.records.append({
                "request_id": member.request_id, "group": member.group, "slot": member.slot, "beta": beta,
                "step": self.bank.groups[member.group].steps,
                "source": source[pos].cpu().clone(), "target": target[pos].cpu().clone(),
                "prediction": prediction[pos].cpu().clone(),
                "candidate_ids": candidates.token_ids[i][candidates.keep[i]].cpu().clone(),
                "candidate_logits": candidates.logits[i][candidates.keep[i]].float().cpu().clone(),
                "fused": scores[i][candidates.keep[i]].float().cpu().clone()})

    # ---- what happened --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters of the whole run and each group's curves (plain Python values, safe to send over RPC).

        Reading a live group's curves synchronises with the device; call it between steps, not in one.
        """
        bank = self.bank
        groups = [_group_record(s.key, s.steps, s.stats, live=False) for s in bank.finished]
        groups += [_group_record(g.key, g.steps, merged_stats([*g.past, g.adapter.stats()]), live=True)
                   for g in bank.groups.values() if g.adapter is not None]
        return {"distiller_updates": bank.updates(), "groups_created": bank.groups_created,
                "groups_freed": bank.groups_freed, "live_groups": len(bank.groups),
                "live_distillers": bank.live_distillers, "live_members": len(self.members),
                "esamp_draws": self.esamp_draws, "esamp_decode_rows": self.decode_rows, "groups": groups}


def _group_record(key: str, steps: int, stats: AdapterStats, *, live: bool) -> dict[str, Any]:
    return {"group": key, "live": live, "steps": steps, "updates": stats.updates,
            "skipped_updates": stats.skipped_nonfinite, "loss_per_step": stats.loss_per_step,
            "relative_error_per_step": stats.relative_error_per_step}
