"""The Distiller bank of a vLLM server: one online Distiller per request group, made and freed on demand.

vLLM admits and finishes requests continuously, so the bank is not a fixed tensor of slots: a
group (the n samples of one request, or the requests sharing an ``esamp_group`` id) gets its own
:class:`~esamp_pl.adapter.TestTimeAdapter` (a bank of one Distiller and its Adam) on its first
decode step, and loses it when its last member finishes. The number of live groups is bounded
only by vLLM's own batch limits; memory stays flat over any number of finished requests.

Inside a group, rows are the members' slots (sample k of an ``n``-request is slot k), so a
group's prediction and update are exactly the own engine's for one prompt with ``n`` samples;
members absent from a step (finished, or not scheduled) are inactive rows that do not train.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from esamp_pl.adapter import AdapterSpec, AdapterStats, TestTimeAdapter

FINISHED_KEPT = 256
"summaries of finished groups kept for inspection (older ones are dropped: memory stays flat)"


@dataclass
class Group:
    """A live request group and its Distiller."""

    key: str
    capacity: int
    "rows of the group's adapter (its n)"
    adapter: TestTimeAdapter | None = None
    "created on the group's first decode step"
    members: dict[str, int] = field(default_factory=dict)
    "live request id -> slot"
    steps: int = 0
    "decode steps on which the group predicted and learned"
    past: list[AdapterStats] = field(default_factory=list)
    "what the group's adapter did before it was widened for more members"

    def free_slot(self) -> int | None:
        used = set(self.members.values())
        return next((slot for slot in range(self.capacity) if slot not in used), None)


@dataclass(frozen=True)
class GroupSummary:
    """What a finished group's Distiller did (read from the device once, when the group ends)."""

    key: str
    steps: int
    stats: AdapterStats


class GroupBank:
    """Live groups keyed by group id; each group's adapter is built by ``make_adapter`` on first use."""

    def __init__(self, spec: AdapterSpec, *, device: torch.device | str,
                 initial_state: Callable[[str], dict[str, torch.Tensor] | None]) -> None:
        """``initial_state(init)`` returns the weights for ``esamp_init`` (warm / svd), or None (random)."""
        self.spec = spec
        self.device = torch.device(device)
        self._initial_state = initial_state
        self.groups: dict[str, Group] = {}
        self.finished: deque[GroupSummary] = deque(maxlen=FINISHED_KEPT)
        self.groups_created = 0
        self.groups_freed = 0
        self.updates_of_finished = 0

    def join(self, key: str, request_id: str, slot: int | None = None, size: int = 1) -> int:
        """Add ``request_id`` to group ``key`` (created if new) and return its row.

        Sample k of an n-request asks for row k; a row already taken, or none asked for, gets the first
        free one. A new group starts with ``size`` rows; a group with no free row is widened (its Distiller and
        Adam moments carry over).
        """
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = Group(key=key, capacity=max(size, (slot or 0) + 1))
        if request_id in group.members:
            return group.members[request_id]
        if slot is None or slot in group.members.values():
            slot = group.free_slot()
            if slot is None:
                slot = group.capacity
        if slot >= group.capacity:
            self._widen(group, slot + 1)
        group.members[request_id] = slot
        return slot

    def _widen(self, group: Group, capacity: int) -> None:
        old = group.adapter
        group.capacity = capacity
        if old is None:
            return
        new = TestTimeAdapter(self.spec, 1, capacity, device=self.device)
        with torch.no_grad():
            for target, source in zip(new.bank.parameters(), old.bank.parameters()):
                target.copy_(source)
            moments = zip(new.optimizer.exp_avg + new.optimizer.exp_avg_sq,
                          old.optimizer.exp_avg + old.optimizer.exp_avg_sq)
            for target, source in moments:
                target.copy_(source)
            new.optimizer.steps.copy_(old.optimizer.steps)
        group.past.append(old.stats())
        group.adapter = new

    def adapter(self, key: str, init: str, seed: int) -> TestTimeAdapter:
        """The group's adapter, made on its first decode step: Distiller drawn from ``seed`` or the ``init``
        weights, fresh Adam moments."""
        group = self.groups[key]
        if group.adapter is None:
            generator = torch.Generator().manual_seed(seed)
            group.adapter = TestTimeAdapter(self.spec, 1, group.capacity, device=self.device, generator=generator)
            state = self._initial_state(init)
            if state is not None:
                group.adapter.load_initial_state(state)
            self.groups_created += 1
        return group.adapter

    def leave(self, key: str, request_id: str) -> None:
        """``request_id`` finished; the group (and its Distiller) is freed with its last member."""
        group = self.groups.get(key)
        if group is None:
            return
        group.members.pop(request_id, None)
        if group.members:
            return
        del self.groups[key]
        if group.adapter is not None:
            stats = merged_stats([*group.past, group.adapter.stats()])
            self.finished.append(GroupSummary(key=key, steps=group.steps, stats=stats))
            self.updates_of_finished += stats.updates
            self.groups_freed += 1

    @property
    def live_distillers(self) -> int:
        return sum(group.adapter is not None for group in self.groups.values())

    def updates(self) -> int:
        """Distiller updates performed so far, finished and live groups (reads the live counters)."""
        live = sum(int(g.adapter.updates) + sum(s.updates for s in g.past)
                   for g in self.groups.values() if g.adapter is not None)
        return self.updates_of_finished + live


def merged_stats(parts: list[AdapterStats]) -> AdapterStats:
    """One group's stats over the adapters it had (it is widened when members join late)."""
    return AdapterStats(updates=sum(p.updates for p in parts), skipped_nonfinite=sum(p.skipped_nonfinite for p in parts),
                        loss_per_step=[v for p in parts for v in p.loss_per_step],
                        relative_error_per_step=[v for p in parts for v in p.relative_error_per_step])
