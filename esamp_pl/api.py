"""The Python API: ESamp on a model and tokenizer you already have, in one call, without Hydra.

    import esamp_pl
    out = esamp_pl.generate(model, tokenizer, prompts, n=8, max_new_tokens=128,
                            esamp=esamp_pl.ESampConfig(beta=0.25, warm_start=True), min_p=0.1, seed=0)
    out.texts[p][i], out.stats.updates

Everything the Hydra scripts build from ``conf/`` is taken from the model here: the Distiller's
hidden size from its config, the stop ids from the tokenizer and generation config, the warm
start from the shipped (or your own) checkpoint whose model fingerprint matches. The settings go
through the same validation as the scripts' (``esamp_pl.settings``), and the same engines
(``esamp_pl.static_engine.make_engine``) decode, so a seed gives the same tokens either way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from esamp_pl import settings as settings_lib
from esamp_pl.adapter import AdapterSpec
from esamp_pl.checkpoint import CheckpointNotFoundError, checkpoint_filename
from esamp_pl.checkpoint_lookup import find_by_fingerprint
from esamp_pl.distiller import DistillerSpec
from esamp_pl.engine import DecodeSettings, ESampSettings, GenerationResult, PromptResult
from esamp_pl.decoding import stop_token_ids
from esamp_pl.models import LoadedModel, ModelSpec, context_length, model_fingerprint
from esamp_pl.optim import AdamSpec
from esamp_pl.prompts import encode_prompts
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SitePair
from esamp_pl.static_engine import check_engine, make_engine

__all__ = ["ESampConfig", "GenerateOutput", "GenerationStats", "generate", "generate_ids", "load_model"]


def engine_supports_kl_budget() -> bool:
    """Whether this esamp_pl's ESamp settings have a KL budget (``ESampSettings.kl_budget``)."""
    return "kl_budget" in {f.name for f in dataclasses.fields(ESampSettings)}


@dataclass(frozen=True)
class ESampConfig:
    """ESamp's settings in one flat record; the defaults are the paper's (``conf/esamp/paper.yaml``).

    Each field is the Hydra key of the same name under ``esamp.`` (``lr`` ... ``grad_clip`` are
    ``esamp.optimizer.*``, ``rank`` is ``distiller.rank``, ``sites`` is ``model.sites``). Invalid values
    raise a ValueError on construction.
    """

    beta: float = ESampSettings.beta
    "tilt toward what the n samples have not explored: new = (1 + beta) l - beta d; 0 gives plain sampling"
    kl_budget: float | None = None
    "a KL budget per step instead of a fixed beta, where this esamp_pl's engine has one (else NotImplementedError)"
    beta_max: float | None = None
    "the largest beta a KL budget may use; None: the engine's default"
    mode: str = ESampSettings.mode
    "esamp, or sharpen_only: (1 + beta) l without a Distiller (a control)"
    scope: str = AdapterSpec.scope
    "per_prompt: a prompt's n samples share one Distiller (paper); shared: one for the whole batch"
    rows_trained: str = AdapterSpec.rows_trained
    "all: every unfinished sample trains its Distiller; first: only sample 0"
    learn: bool = AdapterSpec.learn
    "False freezes the Distillers at their init (a control)"
    update_mode: str = AdapterSpec.update_mode
    "async: the update of step t overlaps the forward of t + 1; sync: inline. Same tokens"
    init: str = "random"
    "random (paper), warm (pre-trained checkpoint) or svd (reference-code heuristic)"
    warm_start: bool = False
    "shortcut for init='warm': the checkpoint whose model fingerprint matches the model's"
    warm_start_path: str | Path | None = None
    "an explicit checkpoint file (implies init='warm')"
    lr: float = AdamSpec.lr
    eps: float = AdamSpec.eps
    betas: tuple[float, float] = AdamSpec.betas
    weight_decay: float = AdamSpec.weight_decay
    grad_clip: float | None = AdamSpec.grad_clip
    "per-Distiller gradient-norm clip; None disables"
    rank: int = DistillerSpec.rank
    "the Distiller's inner width r"
    sites: str = "paper"
    "hidden-state site preset (esamp_pl.sites.SITE_PRESETS): paper or tllm"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        if self.warm_start_path is not None and self.init == "svd":
            raise ValueError("ESampConfig: warm_start_path is a warm start, but init is 'svd'; drop one of them")
        if self._budget() and not engine_supports_kl_budget():
            raise NotImplementedError(f"ESampConfig {sorted(self._budget())}: this esamp_pl's engine has no KL budget "
                                      "yet; set beta instead (kl_budget=None, beta_max=None)")
        SitePair(self.sites)
        _ = self.init_kind  # raises for an unknown init
        self.esamp_settings()  # every other value is checked by the scripts' own validation

    def _budget(self) -> dict[str, float]:
        """The KL-budget fields that are set (the engine validates their values)."""
        return {name: getattr(self, name) for name in ("kl_budget", "beta_max") if getattr(self, name) is not None}

    @property
    def init_kind(self) -> str:
        """The Distiller init this config asks for: random, warm or svd."""
        warm = self.warm_start or self.warm_start_path is not None  # a named checkpoint is never ignored
        return settings_lib.esamp_init({"init": self.init, "warm_start": warm, "warm_start_path": self.warm_start_path})

    def esamp_settings(self, hidden_size: int = 1) -> ESampSettings:
        """The engine's ESamp settings for a model of ``hidden_size``."""
        section = {"beta": self.beta, "mode": self.mode, "scope": self.scope, "rows_trained": self.rows_trained,
                   "learn": self.learn, "update_mode": self.update_mode,
                   "optimizer": {"lr": self.lr, "eps": self.eps, "betas": list(self.betas),
                                 "weight_decay": self.weight_decay, "grad_clip": self.grad_clip}}
        esamp = settings_lib.esamp_settings(section, {"rank": self.rank}, hidden_size)
        return dataclasses.replace(esamp, **self._budget()) if self._budget() else esamp


@dataclass(frozen=True)
class GenerationStats:
    """What a run did: the Distiller updates it performed and the summary figures of the scripts' summary."""

    updates: int
    "Distiller optimizer steps performed (0 with ESamp off)"
    skipped_updates: int
    "Distiller steps skipped for non-finite states"
    tokens_generated: int
    decode_steps: int
    decode_seconds: float
    tokens_per_second: float
    loss_first_step: float | None
    loss_last_step: float | None
    relative_error_first_step: float | None
    relative_error_last_step: float | None
    truncated_rows: int
    "row-steps whose candidate set was cut to max_candidates (0: every step exact)"
    engine_mode: str
    "the decode path that ran"
    init: str | None
    "the Distillers' init (random, warm, svd), None with ESamp off"
    warm_start_path: str | None
    "the checkpoint a warm start read"

    @classmethod
    def of(cls, result: GenerationResult, init: str | None, warm_start_path: Path | None) -> "GenerationStats":
        adapter = result.adapter_stats
        losses = adapter.loss_per_step if adapter is not None else []
        errors = adapter.relative_error_per_step if adapter is not None else []
        return cls(updates=adapter.updates if adapter else 0,
                   skipped_updates=adapter.skipped_nonfinite if adapter else 0,
                   tokens_generated=result.tokens_generated, decode_steps=result.steps,
                   decode_seconds=result.decode_seconds, tokens_per_second=result.tokens_per_second,
                   loss_first_step=losses[0] if losses else None, loss_last_step=losses[-1] if losses else None,
                   relative_error_first_step=errors[0] if errors else None,
                   relative_error_last_step=errors[-1] if errors else None,
                   truncated_rows=result.truncated_rows, engine_mode=result.mode, init=init,
                   warm_start_path=str(warm_start_path) if warm_start_path else None)


@dataclass(frozen=True)
class GenerateOutput:
    """n samples per prompt: ``texts[p][i]`` is sample i of prompt p; the other lists are indexed alike."""

    texts: list[list[str]]
    token_ids: list[list[list[int]]]
    "generated tokens, without the stop token"
    finish_reasons: list[list[str]]
    "'stop' (a stop token was sampled) or 'length' (max_new_tokens reached)"
    perplexities: list[list[float]]
    "of each sample under the generating model (T = 1, no filter, no ESamp); nan if empty"
    stats: GenerationStats
    result: GenerationResult
    "the engine's own result"


def _loaded(model, tokenizer, fingerprint: str, name: str | None, sites: str, chat_template: bool) -> LoadedModel:
    """The record the warm start and the stop ids are read from, for a model that did not come from conf/model."""
    name_or_path = str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
    spec = ModelSpec(name=name or Path(name_or_path).name or "model", name_or_path=name_or_path, sites=sites,
                     chat_template=chat_template)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, fingerprint=fingerprint)


def _initial_state(config: ESampConfig, loaded: LoadedModel,
                   distiller: DistillerSpec) -> tuple[dict[str, torch.Tensor] | None, Path | None]:
    kind = config.init_kind
    if kind == "random":
        return None, None
    from esamp_pl.init import initial_distiller_state  # pre-training side, loaded on demand

    path = Path(config.warm_start_path) if config.warm_start_path is not None else None
    if kind == "warm" and path is None:
        found = find_by_fingerprint(loaded.fingerprint, config.sites, distiller)
        if found is None:
            raise CheckpointNotFoundError(
                f"no pre-trained Distiller for this model (fingerprint {loaded.fingerprint}, sites "
                f"{config.sites!r}, {checkpoint_filename(config.sites, distiller)}) among the shipped or your "
                "checkpoints. Fix: pre-train one (scripts/pretrain_distiller.py), pass ESampConfig(warm_start_path=...)"
                ", or use init='random' or 'svd'")
        path, meta = found
        loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec, name=meta.model_name))
    state = initial_distiller_state(kind, loaded_model=loaded, sites=config.sites, distiller_spec=distiller,
                                    warm_start_path=path)
    return state, path


def generate_ids(model, prompt_ids: list[list[int]], *, stop_token_ids: Sequence[int], pad_token_id: int,
                 n: int = DecodeSettings.n, max_new_tokens: int = DecodeSettings.max_new_tokens,
                 esamp: ESampConfig | None = ESampConfig(), sampling: SamplingParams = SamplingParams(),
                 seed: int = 0, engine: str = "static", cuda_graphs: bool = True, tokenizer=None,
                 on_prompt_done: Callable[[PromptResult], None] | None = None
                 ) -> tuple[GenerationResult, GenerationStats]:
    """The token-level call under :func:`generate` (and the Hugging Face integration): prompts as token ids."""
    check_engine(engine)
    decode = DecodeSettings(n=n, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed,
                            esamp=esamp.esamp_settings(model.config.get_text_config().hidden_size)
                            if esamp is not None else None)
    state, path, init = None, None, None
    if esamp is not None:
        init = esamp.init_kind
        if decode.esamp.uses_distiller:
            loaded = _loaded(model, tokenizer, model_fingerprint(model.config), None, esamp.sites, True)
            state, path = _initial_state(esamp, loaded, decode.esamp.adapter.distiller)
    decoder = make_engine(engine, model, sites=SitePair(esamp.sites if esamp is not None else "paper"),
                          stop_token_ids=list(stop_token_ids), pad_token_id=pad_token_id, cuda_graphs=cuda_graphs)
    result = decoder.generate(prompt_ids, decode, initial_state=state, on_prompt_done=on_prompt_done)
    return result, GenerationStats.of(result, init, path)


def generate(model, tokenizer, prompts: str | Sequence[str], *, n: int = DecodeSettings.n,
             max_new_tokens: int = DecodeSettings.max_new_tokens, esamp: ESampConfig | None = ESampConfig(),
             temperature: float = SamplingParams.temperature, top_k: int = SamplingParams.top_k,
             top_p: float = SamplingParams.top_p, min_p: float = SamplingParams.min_p,
             max_candidates: int = SamplingParams.max_candidates, seed: int = 0, chat_template: bool = True,
             engine: str = "static", cuda_graphs: bool = True,
             on_prompt_done: Callable[[PromptResult], None] | None = None) -> GenerateOutput:
    """n samples for each prompt with ESamp (``esamp=None``: plain sampling with the same filters and seed).

    ``model`` is any Hugging Face decoder-only LM (on the device it should run on), ``tokenizer`` its
    tokenizer. Each prompt becomes one user turn of the chat template when the tokenizer has one
    (``chat_template=False``: the plain text). ``temperature`` ... ``min_p`` are the LM's own filters, which
    ESamp only re-weights. ``engine``: static (fixed shapes, CUDA graphs on CUDA) or eager (the reference
    loop); ``on_prompt_done`` sees each prompt's samples as soon as they are finished.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              max_candidates=max_candidates)
    stops = stop_token_ids(_loaded(model, tokenizer, model_fingerprint(model.config), None, "paper", chat_template))
    if not stops:
        raise ValueError("the tokenizer and the model's generation config name no EOS token; set "
                         "tokenizer.eos_token (esamp_pl stops a sample at it)")
    prompt_ids = encode_prompts(tokenizer, prompts, chat_template=chat_template,
                                max_context=context_length(model.config, tokenizer), max_new_tokens=max_new_tokens)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    result, stats = generate_ids(model, prompt_ids, stop_token_ids=stops, pad_token_id=pad, n=n,
                                 max_new_tokens=max_new_tokens, esamp=esamp, sampling=sampling, seed=seed,
                                 engine=engine, cuda_graphs=cuda_graphs, tokenizer=tokenizer,
                                 on_prompt_done=on_prompt_done)
    samples = [prompt.samples for prompt in result.prompts]
    return GenerateOutput(
        texts=[[tokenizer.decode(s.token_ids, skip_special_tokens=True) for s in row] for row in samples],
        token_ids=[[list(s.token_ids) for s in row] for row in samples],
        finish_reasons=[[s.finish_reason for s in row] for row in samples],
        perplexities=[[s.perplexity for s in row] for row in samples], stats=stats, result=result)


def load_model(name: str = "smollm2-135m", device: str | torch.device = "cpu"):
    """(model, tokenizer) of a ``conf/model`` preset (the offline default: ``smollm2-135m``), a local folder or
    a hub id, loaded the way the scripts load it (checksum-verified GGUF conversion for the bundled models)."""
    from esamp_pl.evaluation.runner import scorer_spec  # the scripts' rule: a preset name, else a folder or hub id
    from esamp_pl.models import load_model as load

    loaded = load(scorer_spec(name), device=device)
    return loaded.model, loaded.tokenizer
