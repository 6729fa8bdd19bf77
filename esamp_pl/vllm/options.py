"""What a vLLM request and a vLLM server ask of ESamp: per-request switches and plugin-wide settings.

Per request, through ``SamplingParams.extra_args`` (the OpenAI-compatible server fills it from
``vllm_xargs`` in the request body). A request without any ``esamp_*`` key is left untouched:

* ``esamp_beta`` (float >= 0): turns ESamp on with this tilt; 0 trains the Distiller but leaves
  every draw to vLLM (exactly vLLM's own output);
* ``esamp_init`` (``random`` | ``warm`` | ``svd``): how the group's Distiller starts;
* ``esamp_group`` (str): requests sent separately that should share one Distiller; without it, the
  n samples of one request (``n=8``) form the group;
* ``esamp_group_size`` (int): how many requests will join an explicit group (default 1 per member seen).

Plugin-wide, through vLLM's ``additional_config={"esamp": {...}}`` (``--additional-config`` on the
command line): the Distiller network, the optimizer and the candidate space, with the same keys and
defaults as ``conf/esamp/paper.yaml`` and ``conf/distiller/default.yaml``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from esamp_pl.adapter import AdapterSpec
from esamp_pl.distiller import DistillerSpec
from esamp_pl.init import INIT_KINDS
from esamp_pl.optim import AdamSpec
from esamp_pl.sites import SITE_PRESETS

PREFIX = "esamp_"
REQUEST_KEYS = ("esamp_beta", "esamp_init", "esamp_group", "esamp_group_size")


@dataclass(frozen=True)
class RequestOptions:
    """One request's ESamp switches (from ``SamplingParams.extra_args``)."""

    beta: float = 0.25
    "tilt toward unexplored directions; 0 = vLLM's own draw (the Distiller still learns)"
    init: str = "random"
    "random | warm | svd: the start of the group's Distiller"
    group: str | None = None
    "explicit group id shared by separate requests; None = the n samples of one request"
    group_size: int | None = None
    "members of an explicit group; None = as many as join before its first decode step"

    def __post_init__(self) -> None:
        if isinstance(self.beta, bool) or not isinstance(self.beta, (int, float)) or not (
                math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"esamp_beta must be a finite float >= 0 (paper default 0.25), but is {self.beta!r}")
        if self.init not in INIT_KINDS:
            raise ValueError(f"esamp_init must be one of {INIT_KINDS}, but is {self.init!r}")
        if self.group is not None and not isinstance(self.group, str):
            raise ValueError(f"esamp_group must be a string, but is {self.group!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"esamp_group_size must be a positive integer, but is {self.group_size!r}")


def request_options(extra_args: dict[str, Any] | None) -> RequestOptions | None:
    """The request's ESamp options, or None when it carries no ``esamp_*`` key (ESamp off)."""
    if not extra_args:
        return None
    keys = {k: v for k, v in extra_args.items() if k.startswith(PREFIX)}
    if not keys:
        return None
    unknown = sorted(set(keys) - set(REQUEST_KEYS))
    if unknown:
        raise ValueError(f"unknown ESamp request key(s) {unknown} in extra_args / vllm_xargs; "
                         f"valid keys: {list(REQUEST_KEYS)}")
    return RequestOptions(**{k.removeprefix(PREFIX): v for k, v in keys.items()})


@dataclass(frozen=True)
class PluginSettings:
    """Server-wide ESamp settings, from ``additional_config["esamp"]``."""

    sites: str = "paper"
    "hidden-state site pair (esamp_pl.sites.SITE_PRESETS); the vLLM plugin captures the paper pair"
    rank: int = 64
    "Distiller inner width r"
    num_blocks: int = 1
    output_norm: bool = True
    init_std: float = 0.02
    gate_bias: float = 1.0
    optimizer: dict[str, Any] = field(default_factory=dict)
    "AdamSpec fields (lr, eps, betas, weight_decay, grad_clip)"
    rows_trained: str = "all"
    "all | first: which samples of a group train its Distiller"
    learn: bool = True
    "False freezes every Distiller at its init (a control)"
    max_candidates: int = 64
    "candidate space searched first (exact: widened when the candidate set is larger)"
    model_name: str | None = None
    "config name for finding warm-start checkpoints (default: the converted folder's record, or the folder name)"
    warm_start_path: str | None = None
    "explicit checkpoint for esamp_init=warm (default: checkpoints/<model_name>/<sites>-r<rank>...)"
    record_steps: int = 0
    "keep the last N decode rows' states and scores for inspection (tests, debugging); 0 keeps none"

    def __post_init__(self) -> None:
        if self.sites != "paper":
            raise ValueError(f"additional_config esamp.sites must be 'paper' in the vLLM plugin "
                             f"(choices elsewhere: {sorted(SITE_PRESETS)}), but is {self.sites!r}")
        if not isinstance(self.max_candidates, int) or self.max_candidates < 1:
            raise ValueError(f"esamp.max_candidates must be a positive integer, but is {self.max_candidates!r}")
        if not isinstance(self.record_steps, int) or self.record_steps < 0:
            raise ValueError(f"esamp.record_steps must be an integer >= 0, but is {self.record_steps!r}")
        self.adapter_spec(1)  # validates the Distiller and optimizer keys now, not at the first decode step

    @classmethod
    def from_additional_config(cls, additional: dict[str, Any] | str | None) -> "PluginSettings":
        if isinstance(additional, str):
            additional = json.loads(additional) if additional else {}
        values = dict((additional or {}).get("esamp", {}) or {})
        allowed = sorted(f.name for f in fields(cls))
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in additional_config['esamp']; valid keys: {allowed}")
        return cls(**values)

    def adapter_spec(self, hidden_size: int) -> AdapterSpec:
        optimizer = dict(self.optimizer)
        if "betas" in optimizer:
            optimizer["betas"] = tuple(optimizer["betas"])
        distiller = DistillerSpec(hidden_size=hidden_size, rank=self.rank, num_blocks=self.num_blocks,
                                  output_norm=self.output_norm, init_std=self.init_std, gate_bias=self.gate_bias)
        return AdapterSpec(distiller=distiller, optimizer=AdamSpec(**optimizer), scope="per_prompt",
                           rows_trained=self.rows_trained, learn=self.learn, update_mode="sync")


def model_name_for(model_path: str, settings: PluginSettings) -> str:
    """The esamp_pl model name of a vLLM model folder (where its warm-start checkpoints are filed)."""
    if settings.model_name:
        return settings.model_name
    record = Path(model_path) / "esamp_pl_conversion.json"
    if record.is_file():
        return json.loads(record.read_text())["name"]
    return Path(model_path).name
