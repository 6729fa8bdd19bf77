"""The Distiller: a small network that predicts a deep hidden state from a shallow one.

One block is the paper's low-rank gated residual (spec, "Defaults"):

    f(s) = LN(s + ((s A) * silu(s G + b)) B)        A, G: d x r,  B: r x d

Several blocks are stacked residually before the single output LayerNorm.

The parameters are held as a *bank*: every tensor has a leading dimension ``num_distillers`` so
that each prompt owns its own Distiller (scope ``per_prompt``) while all of them run in one batched
matmul. Scope ``shared`` is simply a bank of one. Rows are fed grouped by Distiller:
``source`` has shape ``[num_distillers, rows_per_distiller, hidden]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


RELATIVE_ERROR_FLOOR = 1e-12
"the smallest sum ||h||^2 a relative error divides by (all-zero targets)"


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||h - f(s)||^2 per row (summed over the hidden dims, in float32): the Distiller's error (spec Eq. 10)."""
    return (target.float() - prediction.float()).pow(2).sum(-1)


def distiller_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The online loss (spec Eq. 10): mean over rows of :func:`squared_error`; pre-training uses it too."""
    return squared_error(prediction, target).mean()


def relative_error(squared_error_sum, target_squared_sum):
    """sum ||h - f(s)||^2 / sum ||h||^2 (tensors or floats): the error relative to predicting 0."""
    if isinstance(target_squared_sum, torch.Tensor):
        return squared_error_sum / target_squared_sum.clamp(min=RELATIVE_ERROR_FLOOR)
    return squared_error_sum / max(target_squared_sum, RELATIVE_ERROR_FLOOR)


@dataclass(frozen=True)
class DistillerSpec:
    """Architecture of one Distiller; saved with every checkpoint and checked on load."""

    hidden_size: int
    "width d of the source and target hidden states"
    rank: int = 64
    "inner width r of each low-rank gated block (paper: 384, reference code: 64-128)"
    num_blocks: int = 1
    "residual blocks applied before the output LayerNorm"
    output_norm: bool = True
    "affine LayerNorm on the output (the paper's LN); off gives a plain residual map"
    init_std: float = 0.02
    "std of the normal init of A, G and B"
    gate_bias: float = 1.0
    "initial value of the gate bias b (opens the gate at the start)"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("hidden_size", "rank", "num_blocks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"distiller.{name} must be a positive integer, but is {value!r}")
        if self.init_std < 0:
            raise ValueError(f"distiller.init_std must be >= 0, but is {self.init_std}")


class DistillerBank(nn.Module):
    """``num_distillers`` independent Distillers evaluated in one batched call."""

    def __init__(self, spec: DistillerSpec, num_distillers: int, *, device=None, dtype=torch.float32,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if num_distillers < 1:
            raise ValueError(f"num_distillers must be >= 1, but is {num_distillers}")
        self.spec = spec
        self.num_distillers = num_distillers
        p, d, r, k = num_distillers, spec.hidden_size, spec.rank, spec.num_blocks
        factory = dict(device=device, dtype=dtype)
        self.up = nn.Parameter(torch.empty(p, k, d, r, **factory))  # A
        self.gate = nn.Parameter(torch.empty(p, k, d, r, **factory))  # G
        self.gate_bias = nn.Parameter(torch.empty(p, k, 1, r, **factory))  # b
        self.down = nn.Parameter(torch.empty(p, k, r, d, **factory))  # B
        if spec.output_norm:
            self.norm_weight = nn.Parameter(torch.empty(p, 1, d, **factory))
            self.norm_bias = nn.Parameter(torch.empty(p, 1, d, **factory))
        else:
            self.register_parameter("norm_weight", None)
            self.register_parameter("norm_bias", None)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random init of the paper: N(0, init_std) weights, gate bias ``gate_bias``, identity LN."""
        for weight in (self.up, self.gate, self.down):
            # Draw on CPU so that the same seed gives the same Distiller on every device.
            weight.copy_(torch.randn(weight.shape, generator=generator) * self.spec.init_std)
        self.gate_bias.fill_(self.spec.gate_bias)
        if self.norm_weight is not None:
            self.norm_weight.fill_(1.0)
            self.norm_bias.zero_()

    def forward(self, source: torch.Tensor) -> torch.Tensor:
        """Predict targets for ``source`` of shape ``[num_distillers, rows, hidden]``."""
        return self.forward_saving(source, keep=False)[0]

    def forward_saving(self, source: torch.Tensor, *, keep: bool) -> tuple[torch.Tensor, tuple | None]:
        """The forward, the only definition of it; with ``keep`` also the activations that the
        hand-written backward (:class:`esamp_pl.distiller_grad.DistillerGrad`) needs, else None."""
        if source.dim() != 3 or source.shape[0] != self.num_distillers or source.shape[-1] != self.spec.hidden_size:
            raise ValueError(
                f"source must have shape [{self.num_distillers}, rows, {self.spec.hidden_size}], "
                f"but has {tuple(source.shape)}")
        spec = self.spec
        x = source.to(self.up.dtype)
        blocks = []
        for block in range(spec.num_blocks):
            up = torch.bmm(x, self.up[:, block])
            pre_gate = torch.bmm(x, self.gate[:, block]) + self.gate_bias[:, block]
            gate = F.silu(pre_gate)
            inner = up * gate
            if keep:
                blocks.append((x, up, pre_gate, gate, inner))
            x = x + torch.bmm(inner, self.down[:, block])
        norm = None
        if self.norm_weight is not None:
            normed, mean, rstd = torch.native_layer_norm(x, (spec.hidden_size,), None, None, spec.norm_eps)
            norm = (x, normed, mean, rstd)
            x = normed * self.norm_weight + self.norm_bias
        return x, ((blocks, norm) if keep else None)

    @torch.no_grad()
    def load_single(self, state: dict[str, torch.Tensor]) -> None:
        """Copy one Distiller's weights (a bank of one, e.g. a warm start) into every slot."""
        for name, param in self.named_parameters():
            if name not in state:
                raise KeyError(f"Distiller weights lack the tensor {name!r}")
            value = state[name]
            if value.shape[1:] != param.shape[1:] or value.shape[0] != 1:
                raise ValueError(f"Distiller tensor {name!r} has shape {tuple(value.shape)}, "
                                 f"expected {(1, *param.shape[1:])}")
            param.copy_(value.to(param.dtype).expand_as(param))

    def single_state(self, index: int = 0) -> dict[str, torch.Tensor]:
        """Weights of one slot as a bank of one (what checkpoints store)."""
        return {name: param.detach()[index:index + 1].clone() for name, param in self.named_parameters()}
