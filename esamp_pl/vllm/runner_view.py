"""What the plugin reads from any vLLM model runner, V1 or Model Runner V2 (the same attributes in both).

Each runner's adapter (``v1_runner.py``, ``mrv2_runner.py``) subclasses :class:`RunnerViewBase` with what
only its runner has (batch rows, request ids), so a change in one runner touches one file.
"""

from __future__ import annotations

from typing import Any

import torch


class RunnerViewBase:
    """A model runner's model, config, speculative decoding and scheduler limits."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner

    @property
    def model(self) -> torch.nn.Module:
        return self.runner.model

    @property
    def vllm_config(self) -> Any:
        return self.runner.vllm_config

    def speculative(self) -> bool:
        return self.runner.speculative_config is not None

    def max_tokens(self) -> int:
        return int(self.runner.scheduler_config.max_num_batched_tokens)

    def max_requests(self) -> int:
        return int(self.runner.scheduler_config.max_num_seqs)
