"""The Distiller bank's forward and backward written out by hand, for the online update.

autograd gets the gradient right, but for a network this small its bookkeeping is most of the
cost of an online step on a CPU: a graph node per op, and for every ``bank.up[:, block]`` slice a
zero-filled gradient the size of the whole tensor. The online update needs the gradient of one
known loss through one known network, so it is written out here: a dozen batched ops, with the
gradients written into persistent buffers (nothing large is allocated per step, and the step is
plain tensor code that a CUDA graph can capture). ``tests/test_distiller_grad.py`` checks it
against autograd.

The forward is the module's own (:meth:`DistillerBank.forward_saving`, defined once), so the
predictions are bit-identical to ``bank(source)``; it only keeps the activations the backward needs.
"""

from __future__ import annotations

import torch

from esamp_pl.distiller import DistillerBank


class DistillerGrad:
    """Forward with saved activations, and backward into persistent gradient buffers, of a bank."""

    def __init__(self, bank: DistillerBank) -> None:
        self.bank = bank
        self.names = [name for name, _ in bank.named_parameters()]
        self.grads = {name: torch.zeros_like(p) for name, p in bank.named_parameters()}

    def grad_list(self) -> list[torch.Tensor]:
        """The gradient buffers in ``bank.parameters()`` order."""
        return [self.grads[name] for name in self.names]

    @torch.no_grad()
    def forward(self, source: torch.Tensor, *, keep: bool) -> tuple[torch.Tensor, tuple | None]:
        """``bank(source)`` for ``source`` ``[num_distillers, rows, hidden]``; with ``keep`` also what
        :meth:`backward` needs."""
        return self.bank.forward_saving(source, keep=keep)

    @torch.no_grad()
    def backward(self, saved: tuple, grad_output: torch.Tensor) -> list[torch.Tensor]:
        """Gradients of the loss w.r.t. every bank tensor, given its gradient w.r.t. the prediction
        (``[num_distillers, rows, hidden]``). Written into :attr:`grads`; returned in parameter order."""
        bank, grads = self.bank, self.grads
        blocks, norm = saved
        grad_x = grad_output
        if norm is not None:
            x, normed, mean, rstd = norm
            torch.sum(grad_output * normed, dim=1, keepdim=True, out=grads["norm_weight"])
            torch.sum(grad_output, dim=1, keepdim=True, out=grads["norm_bias"])
            grad_x = torch.ops.aten.native_layer_norm_backward(
                grad_output * bank.norm_weight, x, [self.bank.spec.hidden_size], mean, rstd, None, None,
                [True, False, False])[0]
        for block in reversed(range(len(blocks))):
            x, up, pre_gate, gate, inner = blocks[block]
            torch.bmm(inner.transpose(1, 2), grad_x, out=grads["down"][:, block])
            grad_inner = torch.bmm(grad_x, bank.down[:, block].transpose(1, 2))
            grad_up = grad_inner * gate
            grad_pre_gate = torch.ops.aten.silu_backward(grad_inner * up, pre_gate)
            x_t = x.transpose(1, 2)
            torch.bmm(x_t, grad_up, out=grads["up"][:, block])
            torch.bmm(x_t, grad_pre_gate, out=grads["gate"][:, block])
            torch.sum(grad_pre_gate, dim=1, keepdim=True, out=grads["gate_bias"][:, block])
            if block > 0:  # the residual stream carries the gradient on to the block before
                grad_x = (grad_x + torch.bmm(grad_up, bank.up[:, block].transpose(1, 2))
                          + torch.bmm(grad_pre_gate, bank.gate[:, block].transpose(1, 2)))
        return self.grad_list()
