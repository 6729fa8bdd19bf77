"""The pairs of the last k decode steps, in k fixed slots: one Distiller update every k steps.

With ``esamp.update_every = k`` the adapter takes one optimizer step per Distiller every k decode
steps, on the (source, target) pairs of those k steps (mean over them of ``||h - f(s)||^2``), instead
of one per step: the update is the part of ESamp's overhead that scales with the steps, so k > 1
divides it by k. The semantics otherwise stay the paper's: the update on the block ending at step t
first affects the prediction of step t + 1, and within a block every prediction uses the parameters
after the previous block. A last block cut short by the end of generation is not trained on (no step
follows it), so a run of S decode steps makes ``floor(S / k)`` updates per Distiller.

The slots are written at a slot index that lives on the device (the write can be captured in a CUDA
graph with the rest of the decode step); whether a step completes a block is counted on the host, by
the updater that calls :meth:`PairRing.step_done` once per step, so nothing is ever read back.
The buffers are laid out ``[distillers, k, rows per Distiller, hidden]``: a Distiller's pairs of the
block are contiguous, which is the grouping the adapter's update expects.
"""

from __future__ import annotations

import torch


class PairRing:
    """k fixed slots of (source, target, active rows), written one decode step at a time."""

    def __init__(self, every: int, num_distillers: int) -> None:
        if not isinstance(every, int) or every < 2:
            raise ValueError(f"a pair ring holds 2 or more steps, but was asked for {every!r}")
        self.every = every
        self.num_distillers = num_distillers
        self.buffers: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        "(source, target, active) of shape [distillers, k, rows per Distiller(, hidden)]"
        self._slot: torch.Tensor | None = None
        self._steps = 0  # host count of the steps written, to know when a block is complete

    def write(self, source: torch.Tensor, target: torch.Tensor, active: torch.Tensor) -> None:
        """Copy this step's ``[rows, ...]`` pairs into the next slot (device ops only)."""
        values = (source, target, active)
        if self.buffers is None:
            self.buffers = tuple(torch.empty(self.num_distillers, self.every, len(v) // self.num_distillers,
                                             *v.shape[1:], dtype=v.dtype, device=v.device) for v in values)
            self._slot = torch.zeros(1, dtype=torch.long, device=source.device)
        for buffer, value in zip(self.buffers, values):
            buffer.index_copy_(1, self._slot, value.reshape(self.num_distillers, 1, -1, *value.shape[1:]))
        self._slot.add_(1).remainder_(self.every)

    def step_done(self) -> bool:
        """Count one written step (host side); True when it completes a block of k steps."""
        self._steps += 1
        return self._steps % self.every == 0

    def block(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's pairs as ``[distillers * k * rows per Distiller, ...]``, each Distiller's rows contiguous."""
        if self.buffers is None:
            raise RuntimeError("the pair ring is empty: write() a step before training on it")
        return tuple(b.view(-1, *b.shape[3:]) for b in self.buffers)

    def reset(self) -> None:
        """Start a new generation: the next write goes to slot 0 and the block count restarts."""
        self._steps = 0
        if self._slot is not None:
            self._slot.zero_()
