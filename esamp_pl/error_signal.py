"""Which Distiller error the fusion tilts along: the paper's plain error, or the error relative to siblings.

The fused logits are ``(1 + beta) l - beta d`` with ``d = W h_hat`` (spec Eq. 7), so on every
candidate ``fused - l = beta * W (h - h_hat) = beta * W e``: the tilt follows the latent error
``e = h - h_hat``. Part of a warm start's error can be common to all n samples of a prompt (a
generic direction the Distiller has not learned); tilting along it pushes every sample the same way.

``relative`` removes it: sample i tilts along ``e_i - mean_j e_j``, the mean over the prompt's
active rows, i.e. what sample i does that its siblings do not. Since the target ``h`` of a step is
captured in the same forward as the source, before the token is chosen, this needs nothing new from
the fusion: feeding the head the adjusted prediction ``h_hat_i' = h_i - (e_i - mean_j e_j) =
h_hat_i + mean_j e_j`` gives ``l - d' = W (e_i - mean_j e_j)``, hence ``fused - l = beta W (e_i -
mean_j e_j)``. A prompt with one active row has nothing to compare with: its tilt is zero (plain
sampling for that row).

Fixed shapes, no host synchronisation: it runs inside the static engine's captured step.
"""

from __future__ import annotations

import torch

ERROR_KINDS = ("plain", "relative")


def prediction_for_fusion(prediction: torch.Tensor, target: torch.Tensor, active: torch.Tensor,
                          samples_per_prompt: int, kind: str) -> torch.Tensor:
    """The prediction the head turns into the Distiller's logits, for error ``kind``.

    ``prediction`` and ``target`` are ``[rows, hidden]`` (rows prompt-major, ``samples_per_prompt``
    per prompt), ``active`` ``[rows]`` bool (unfinished rows). ``plain`` returns ``prediction``
    unchanged; ``relative`` returns ``prediction + mean e`` over the prompt's active rows whose error
    is finite (a row with a non-finite prediction stays non-finite, so the fusion still ignores it).
    """
    if kind == "plain":
        return prediction
    if kind != "relative":
        raise ValueError(f"esamp.error must be one of {ERROR_KINDS}, but is {kind!r}")
    error = target.float() - prediction.float()
    usable = active & torch.isfinite(error).all(-1)
    error = error.masked_fill(~usable.unsqueeze(-1), 0.0).view(-1, samples_per_prompt, error.shape[-1])
    count = usable.view(-1, samples_per_prompt).sum(-1, keepdim=True).clamp(min=1)
    mean_error = error.sum(1) / count  # [prompts, hidden]
    return prediction + mean_error.repeat_interleave(samples_per_prompt, dim=0).to(prediction.dtype)
