"""Adam for a bank of Distillers: per-Distiller gradient clipping and per-Distiller skipping.

``torch.optim.Adam`` over the bank's tensors would already keep independent moments per element,
but it clips the *global* gradient norm and moves every Distiller on every step (momentum moves a
Distiller even when its prompt had nothing to train on). This optimizer treats slot ``i`` of every
tensor as Distiller ``i``: its own grad-norm clip, its own step count, and a mask that leaves a
Distiller untouched (no moment update either) when it must not learn this step. Everything is
tensor arithmetic on the parameters' device, with no host synchronisation, so it can be
captured in a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdamSpec:
    """Online optimizer settings (paper App. E.2 defaults)."""

    lr: float = 4e-4
    "step size"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-4
    "large eps (paper) keeps the first steps from being huge"
    weight_decay: float = 0.0
    "decoupled (AdamW-style) decay; the reference code's preset uses 0.01"
    grad_clip: float | None = 0.5
    "max grad norm per Distiller; None disables clipping"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, but is {self.lr}")
        if not self.eps > 0:
            raise ValueError(f"optimizer eps must be > 0, but is {self.eps}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optimizer grad_clip must be > 0 or null, but is {self.grad_clip}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer betas must lie in [0, 1), but are {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer weight_decay must be >= 0, but is {self.weight_decay}")


class BankAdam:
    """Adam over tensors whose leading dimension indexes independent Distillers."""

    def __init__(self, params: list[torch.Tensor], spec: AdamSpec) -> None:
        self.params = list(params)
        self.spec = spec
        num = self.params[0].shape[0]
        device = self.params[0].device
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(num, device=device, dtype=torch.float32)

    def _per_slot(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return values.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], update_mask: torch.Tensor) -> None:
        """Apply one step to the Distillers where ``update_mask`` ([num], bool) is true."""
        spec = self.spec
        beta1, beta2 = spec.betas
        mask = update_mask.to(torch.float32)
        if spec.grad_clip is not None:
            sq = sum(g.pow(2).flatten(1).sum(1) for g in grads)
            scale = (spec.grad_clip / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        else:
            scale = torch.ones_like(mask)
        self.steps.add_(mask)
        # Slots that never stepped keep step 0; clamp so the bias corrections stay finite.
        steps = self.steps.clamp(min=1.0)
        bias1 = 1 - beta1 ** steps
        bias2 = 1 - beta2 ** steps
        step_size = spec.lr / bias1 * mask
        for param, grad, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            g = grad * self._per_slot(scale, grad)
            keep = self._per_slot(mask, param)
            # m <- m + keep * (1 - beta1) * (g - m): unchanged where keep == 0.
            m.add_(keep * (1 - beta1) * (g - m))
            v.add_(keep * (1 - beta2) * (g * g - v))
            denom = (v / self._per_slot(bias2, v)).sqrt_().add_(spec.eps)
            if spec.weight_decay:
                param.mul_(1 - spec.lr * spec.weight_decay * keep)
            param.sub_(self._per_slot(step_size, param) * m / denom)

    def reset(self) -> None:
        """Fresh moments (used when a warm start is copied in)."""
        for t in (*self.exp_avg, *self.exp_avg_sq):
            t.zero_()
        self.steps.zero_()
