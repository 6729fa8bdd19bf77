"""Capture of ESamp's source and target states inside vLLM's forward, into fixed buffers.

vLLM runs its decoder on flattened token rows (all requests' scheduled tokens in one
``[tokens, hidden]`` tensor) and its Llama-style layers and norms return the pair
``(hidden, residual)`` with the residual add deferred to the next norm:

* source (``block0_output``, HF ``hidden_states[1]``): the residual stream after block 0, i.e.
  ``hidden + residual`` of layer 0's output;
* target (``final_norm_output``): the first element of the final norm's output, the vector the
  LM head is applied to.

The hooks write into buffers allocated once (``torch.add(..., out=)`` / ``copy_``), so they stay
valid under vLLM's CUDA graphs and never synchronise with the host. Which rows are the decode
rows of which request is the runner's knowledge (see :mod:`esamp_pl.vllm.v1_runner`).
"""

from __future__ import annotations

import torch
from torch import nn

from esamp_pl.sites import SitePair, site_module


class VllmStateCapture:
    """Forward hooks on a vLLM decoder keeping every token row's source and target of the latest forward."""

    def __init__(self, model: nn.Module, *, max_tokens: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device | str, sites: SitePair = SitePair("paper")) -> None:
        if sites.preset != "paper":
            raise ValueError(f"the vLLM plugin captures the 'paper' site pair only, not {sites.preset!r}")
        self.source = torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
        self.target = torch.zeros(max_tokens, hidden_size, dtype=dtype, device=device)
        self.num_tokens = 0
        "token rows written by the latest forward (a shape, known on the host)"
        self._handles = [site_module(model, sites.source).register_forward_hook(self._store_source),
                         site_module(model, sites.target).register_forward_hook(self._store_target)]

    def _fit(self, rows: int) -> None:
        if rows > self.source.shape[0]:  # a larger forward than planned: grow once (never inside a graph)
            self.source = self.source.new_zeros(rows, self.source.shape[1])
            self.target = self.target.new_zeros(rows, self.target.shape[1])

    def _store_source(self, _module, _inputs, output) -> None:
        hidden, residual = output if isinstance(output, (tuple, list)) else (output, None)
        rows = hidden.shape[0]
        self._fit(rows)
        if residual is None:
            self.source[:rows].copy_(hidden)
        else:
            torch.add(hidden, residual, out=self.source[:rows])
        self.num_tokens = rows

    def _store_target(self, _module, _inputs, output) -> None:
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        rows = hidden.shape[0]
        self._fit(rows)
        self.target[:rows].copy_(hidden)

    def rows(self, token_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, target) of the token rows ``token_index`` of the latest forward."""
        return self.source.index_select(0, token_index), self.target.index_select(0, token_index)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
