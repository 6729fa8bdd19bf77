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
        if source.dim() != 3 or source.shape[0] != self.num_distillers or source.shape[-1] != self.spec.hidden_size:
            raise ValueError(
                f"source must have shape [{self.num_distillers}, rows, {self.spec.hidden_size}], "
                f"but has {tuple(source.shape)}")
        x = source.to(self.up.dtype)
        for block in range(self.spec.num_blocks):
            up = torch.bmm(x, self.up[:, block])
            gate = F.silu(torch.bmm(x, self.gate[:, block]) + self.gate_bias[:, block])
            x = x + torch.bmm(up * gate, self.down[:, block])
        if self.norm_weight is not None:
            x = F.layer_norm(x, (self.spec.hidden_size,), eps=self.spec.norm_eps)
            x = x * self.norm_weight + self.norm_bias
        return x

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
