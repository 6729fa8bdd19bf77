"""The three ways a Distiller starts: random (paper), warm (pre-trained checkpoint), svd (reference code).

:func:`initial_distiller_state` returns one Distiller's weights (a bank of one) that the generation
code copies into every prompt's Distiller with ``TestTimeAdapter.load_initial_state``, or ``None``
for the paper's random init. Keeping the three behind one function makes them easy to compare.

The ``svd`` init follows the reference code's heuristic in our f(s) form. The last decoder layer's
SwiGLU FFN, ``x -> W_down (silu(W_gate x) * (W_up x))``, is linearised as
``x -> W_down ((W_gate + W_up) / 2) x =: L x`` (a d x d map). Its rank-r SVD ``L ~ U S V^T`` gives a
block whose delta is exactly that rank-r linear map when the gate is constant:

    A = V sqrt(S),  B = sqrt(S) U^T / silu(b),  G = 0  (so the gate is silu(b) everywhere)

so ``s + ((s A) * silu(b)) B = s + s V S U^T = s + (L_r s^T)^T``: the residual plus the last layer's
linearised FFN, then the usual output LayerNorm (identity affine). Note the reference code composes
the factors the other way round (it applies ``L^T`` to row vectors); we apply ``L`` as the layer
does. Further blocks, if any, start at zero so they do nothing until trained. It is a heuristic: it
uses no data and ignores attention and the norms, which is why the warm start exists.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from esamp_pl.checkpoint import check_state_shapes, load_checkpoint, validate_checkpoint, warm_start_file
from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.sites import SitePair, decoder_stack

if TYPE_CHECKING:
    from esamp_pl.models import LoadedModel

INIT_KINDS = ("random", "warm", "svd")
log = logging.getLogger(__name__)


def initial_distiller_state(kind: str, *, loaded_model: "LoadedModel", sites: SitePair | str,
                            distiller_spec: DistillerSpec, warm_start_path: str | Path | None = None,
                            checkpoints_dir: str | Path | None = None) -> dict[str, torch.Tensor] | None:
    """One Distiller's starting weights for ``kind``; ``None`` keeps the random init.

    ``warm`` reads ``warm_start_path`` or finds ``checkpoints/<model>/<sites>-r<rank>...`` and checks
    it was trained for this model (config fingerprint), site pair and architecture.
    """
    if kind not in INIT_KINDS:
        raise ValueError(f"esamp.init must be one of {INIT_KINDS}, but is {kind!r}")
    preset = sites.preset if isinstance(sites, SitePair) else SitePair(sites).preset
    if kind == "random":
        return None
    if kind == "svd":
        return svd_state(loaded_model.model, distiller_spec)
    path = warm_start_file(loaded_model.spec.name, preset, distiller_spec, warm_start_path, checkpoints_dir)
    state, meta = load_checkpoint(path)
    validate_checkpoint(meta, model_fingerprint=loaded_model.fingerprint, sites=preset, spec=distiller_spec,
                        model_name=loaded_model.spec.name,
                        path=path)
    check_state_shapes(state, distiller_spec, path)
    log.info("warm start from %s (pre-trained %d steps, val_mse %s)", path, meta.steps,
             meta.metrics.get("val/mse"))
    return state


def _ffn_weights(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(down [d, ff], up [ff, d], gate [ff, d] or None) of a decoder layer's MLP."""
    mlp = getattr(layer, "mlp", None) or getattr(layer, "feed_forward", None)
    down = getattr(mlp, "down_proj", None)
    up = getattr(mlp, "up_proj", None)
    gate = getattr(mlp, "gate_proj", None)
    if down is None or up is None:
        fused = getattr(mlp, "gate_up_proj", None)
        if down is None or fused is None:
            raise ValueError(f"svd init needs the last layer's FFN (mlp.up_proj / down_proj), but "
                             f"{type(layer).__name__} has none; use esamp.init=random or warm")
        gate_w, up_w = fused.weight.chunk(2, dim=0)
        return down.weight, up_w, gate_w
    return down.weight, up.weight, gate.weight if gate is not None else None


@torch.no_grad()
def svd_state(model: nn.Module, spec: DistillerSpec) -> dict[str, torch.Tensor]:
    """Rank-r SVD of the last layer's linearised FFN as a Distiller (see the module docstring)."""
    layers, _ = decoder_stack(model)
    down, up, gate = (w.detach().float().cpu() if w is not None else None for w in _ffn_weights(layers[-1]))
    d = spec.hidden_size
    if down.shape[0] != d or up.shape[1] != d:
        raise ValueError(f"svd init: the last layer's FFN maps {up.shape[1]} -> {down.shape[0]}, but the "
                         f"Distiller's hidden size is {d}")
    inner = up if gate is None else (up + gate) / 2
    linear = down @ inner  # [d, d]: column-vector map x -> L x
    u, s, vh = torch.linalg.svd(linear, full_matrices=False)
    r = min(spec.rank, s.numel())
    root = s[:r].clamp(min=1e-8).sqrt()
    gate_value = spec.gate_bias / (1 + math.exp(-spec.gate_bias))  # silu(b)
    if abs(gate_value) < 1e-6:
        raise ValueError(f"svd init needs a non-zero gate silu(gate_bias); distiller.gate_bias is {spec.gate_bias}")
    bank = DistillerBank(spec, 1, device="cpu")
    state = {name: torch.zeros_like(param) for name, param in bank.named_parameters()}
    state["up"][0, 0, :, :r] = vh[:r].T * root  # A = V sqrt(S)
    state["down"][0, 0, :r, :] = (root[:, None] * u[:, :r].T) / gate_value  # B = sqrt(S) U^T / silu(b)
    state["gate_bias"].fill_(spec.gate_bias)
    if spec.output_norm:
        state["norm_weight"].fill_(1.0)
    return state
