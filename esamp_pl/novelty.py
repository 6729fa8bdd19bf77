"""Is the Distiller's error a novelty detector? The diagnostic behind ``scripts/diagnose_novelty.py``.

The paper's premise is that the Distiller errs where a prompt's n samples have not been yet. For
decode step t and row i of a prompt (spec, "Novelty signal"):

* ``novelty = 1 - max cos(h_it, m)`` over the memory m of that prompt's target states at all earlier
  decode steps, all its rows (what its Distiller has been trained on; the prefill is not);
* ``signal = ||h_it - f(s_it)||^2 / ||h_it||^2``, with the prediction made before this step's update;
* ``relative signal = ||e_it - mean_j e_jt||^2 / ||h_it||^2``, with ``e = h - f(s)`` and the mean over the
  prompt's running rows: the error ``esamp.error=relative`` tilts along (what sample i does that its
  siblings do not), reported beside the plain one as ``spearman_relative``.

:class:`NoveltyProbe` is an engine observer (``DecodeEngine.generate(observer=...)``) that collects
both for the running rows, plus KL(pi_new || pi_ref) and the mean |Δlogit| on the candidates. Its
summary gives the Spearman correlation of signal and novelty *within each step* (ranks across the
prompt's rows, which removes the common downward trend of both over time), averaged over the
prompt's steps, then mean ± s.e. over prompts; and *pooled* over the prompt's run (all its
row-steps), mean ± s.e. over prompts.

:func:`run_diagnostic` decodes the same prompts for every init (random, warm, svd, and the frozen
controls ``frozen_<init>``: the same init with ``esamp.learn=false``) at each beta of ``betas``;
at beta = 0 every init sees the very same tokens, so the correlations compare signals on identical
hidden states. Each (beta, init) run is saved as JSON in ``output_dir`` as soon as it ends, and a
rerun with the same settings reuses it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from esamp_pl.evaluation.stats import standard_error
from esamp_pl.files import write_json_atomic
from esamp_pl.engine import DecodeSettings, StepObservation
from esamp_pl.kl_budget import candidate_kl

log = logging.getLogger(__name__)

FROZEN_PREFIX = "frozen_"
MIN_ROWS = 3
"fewest rows a within-step rank correlation is computed from (with 2 it is always +-1)"


# -- statistics ---------------------------------------------------------------------------------------------

def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    ordered, order = torch.sort(values.double())
    _, group, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    group_rank = last - (counts.double() - 1) / 2
    ranks = torch.empty_like(ordered)
    ranks[order] = group_rank[group]
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float | None:
    """Spearman's rank correlation (Pearson of average ranks, so ties are handled); None if undefined
    (fewer than :data:`MIN_ROWS` pairs, or one side constant)."""
    if x.numel() != y.numel():
        raise ValueError(f"spearman needs pairs, but got {x.numel()} and {y.numel()} values")
    if x.numel() < MIN_ROWS:
        return None
    rx, ry = average_ranks(x.flatten()), average_ranks(y.flatten())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float(rx.norm() * ry.norm())
    return float((rx * ry).sum()) / denominator if denominator > 0 else None


def mean_and_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (the evaluation's definition); nan where undefined."""
    if not values:
        return math.nan, math.nan
    return sum(values) / len(values), standard_error(values)


# -- the observer -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _PromptTrace:
    memory: list[torch.Tensor] = dataclasses.field(default_factory=list)
    "unit-norm target states of earlier decode steps, [rows, d] each"
    step_correlations: list[float] = dataclasses.field(default_factory=list)
    relative_correlations: list[float] = dataclasses.field(default_factory=list)
    "within-step Spearman of the relative signal and novelty"
    signals: list[torch.Tensor] = dataclasses.field(default_factory=list)
    novelties: list[torch.Tensor] = dataclasses.field(default_factory=list)


class NoveltyProbe:
    """Engine observer: novelty memory per prompt, signal and novelty per row-step, KL and |Δlogit|."""

    def __init__(self, num_prompts: int, n: int, *, temperature: float = 1.0) -> None:
        self.n = n
        self.temperature = temperature if temperature > 0 else 1.0
        self.prompts = [_PromptTrace() for _ in range(num_prompts)]
        self._kl: list[torch.Tensor] = []
        self._dlogit: list[torch.Tensor] = []

    def __call__(self, obs: StepObservation) -> None:
        if obs.prediction is None:
            raise ValueError("the novelty diagnostic needs a Distiller (esamp.mode=esamp)")
        active = obs.active.cpu()
        target = obs.target.float().cpu()
        prediction = obs.prediction.float().cpu()
        error = target - prediction
        target_norm = target.pow(2).sum(-1).clamp(min=1e-30)
        signal = error.pow(2).sum(-1) / target_norm
        usable = active & torch.isfinite(signal)
        unit = torch.nn.functional.normalize(target, dim=-1)
        for p, trace in enumerate(self.prompts):
            rows = slice(p * self.n, (p + 1) * self.n)
            keep = usable[rows]
            if not keep.any():
                continue
            states = unit[rows][keep]
            if trace.memory:
                memory = torch.cat(trace.memory)
                novelty = 1.0 - (states @ memory.T).max(dim=-1).values
                step_signal = signal[rows][keep]
                trace.signals.append(step_signal)
                trace.novelties.append(novelty)
                rho = spearman(step_signal, novelty)
                if rho is not None:
                    trace.step_correlations.append(rho)
                own = error[rows][keep]
                relative = (own - own.mean(0)).pow(2).sum(-1) / target_norm[rows][keep]
                rho_relative = spearman(relative, novelty)
                if rho_relative is not None:
                    trace.relative_correlations.append(rho_relative)
            trace.memory.append(states)
        self._record_tilt(obs, active)

    def _record_tilt(self, obs: StepObservation, active: torch.Tensor) -> None:
        candidates = obs.candidates
        keep = candidates.keep
        lm = candidates.logits.float()
        kl = candidate_kl(obs.scores, lm, keep, self.temperature).cpu()
        dlogit = (torch.where(keep, (obs.scores.float() - lm).abs(), 0.0).sum(-1) / keep.sum(-1)).cpu()
        self._kl.append(kl[active])
        self._dlogit.append(dlogit[active])

    def per_prompt(self) -> list[dict[str, Any]]:
        """Per prompt: mean within-step Spearman, pooled Spearman, steps and row-steps counted."""
        out = []
        for trace in self.prompts:
            within = mean_and_se(trace.step_correlations)[0] if trace.step_correlations else None
            relative = mean_and_se(trace.relative_correlations)[0] if trace.relative_correlations else None
            pooled = (spearman(torch.cat(trace.signals), torch.cat(trace.novelties)) if trace.signals else None)
            out.append({"spearman": within, "spearman_relative": relative, "spearman_pooled": pooled,
                        "steps": len(trace.step_correlations),
                        "row_steps": int(sum(s.numel() for s in trace.signals)),
                        "signal_mean": float(torch.cat(trace.signals).mean()) if trace.signals else None,
                        "novelty_mean": float(torch.cat(trace.novelties).mean()) if trace.novelties else None})
        return out

    def summary(self) -> dict[str, Any]:
        """Correlations (mean ± s.e. over prompts), mean KL per row-step and mean |Δlogit| on the candidates."""
        prompts = self.per_prompt()
        within = [p["spearman"] for p in prompts if p["spearman"] is not None]
        pooled = [p["spearman_pooled"] for p in prompts if p["spearman_pooled"] is not None]
        relative = [p["spearman_relative"] for p in prompts if p["spearman_relative"] is not None]
        (rho, rho_se), (pooled_rho, pooled_se) = mean_and_se(within), mean_and_se(pooled)
        relative_rho, relative_se = mean_and_se(relative)
        kl = torch.cat(self._kl) if self._kl else torch.zeros(0)
        dlogit = torch.cat(self._dlogit) if self._dlogit else torch.zeros(0)
        return {"spearman": rho, "spearman_se": rho_se, "spearman_pooled": pooled_rho,
                "spearman_pooled_se": pooled_se, "spearman_relative": relative_rho,
                "spearman_relative_se": relative_se, "prompts_counted": len(within),
                "kl_per_step": float(kl.double().mean()) if kl.numel() else math.nan,
                "abs_dlogit": float(dlogit.double().mean()) if dlogit.numel() else math.nan,
                "per_prompt": prompts}


# -- the diagnostic run -------------------------------------------------------------------------------------

def parse_init(name: str) -> tuple[str, bool]:
    """``warm`` -> (warm, learns); ``frozen_warm`` -> (warm, frozen). Unknown names are a ValueError."""
    from esamp_pl.init import INIT_KINDS

    frozen = name.startswith(FROZEN_PREFIX)
    kind = name[len(FROZEN_PREFIX):] if frozen else name
    if kind not in INIT_KINDS:
        choices = list(INIT_KINDS) + [FROZEN_PREFIX + k for k in INIT_KINDS]
        raise ValueError(f"inits: unknown init {name!r}; choose from {choices}")
    return kind, not frozen


def _variants(cfg: DictConfig) -> list[tuple[str, dict]]:
    """(label, esamp overrides) for every beta and KL budget to run."""
    variants = []
    for beta in cfg.betas:
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or beta < 0:
            raise ValueError(f"betas: every value must be a float >= 0, but got {beta!r}")
        variants.append((f"beta{beta:g}", {"beta": float(beta), "kl_budget": None}))
    for budget in cfg.get("kl_budgets") or []:
        variants.append((f"kl{budget:g}", {"kl_budget": budget}))
    if not variants:
        raise ValueError("betas and kl_budgets are both empty: give at least one, e.g. betas=[0,0.25]")
    return variants


def _settings_for(decode: DecodeSettings, overrides: dict, learn: bool) -> DecodeSettings:
    esamp = decode.esamp
    adapter = dataclasses.replace(esamp.adapter, learn=learn)
    return dataclasses.replace(decode, esamp=dataclasses.replace(esamp, adapter=adapter, **overrides))


def _run_key(cfg: DictConfig, prompts: list[str], settings: DecodeSettings, init: str) -> dict[str, Any]:
    """What decides a run's numbers; a saved run is reused only when its key is the same."""
    text = json.dumps(prompts, ensure_ascii=False).encode()
    return {"model": cfg.model.name, "sites": cfg.model.sites, "init": init,
            "prompts_sha256": hashlib.sha256(text).hexdigest()[:16], "prompts": len(prompts),
            "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
            "warm_start_path": cfg.esamp.get("warm_start_path")}


def _tokens_digest(result) -> str:
    tokens = [s.token_ids for p in result.prompts for s in p.samples]
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]




def run_diagnostic(cfg: DictConfig) -> dict[str, Any]:
    """Every (beta or KL budget, init) run of ``cfg``; returns the report (see the module docstring)."""
    from esamp_pl import settings as settings_lib
    from esamp_pl.decoding import build_engine
    from esamp_pl.init import initial_distiller_state
    from esamp_pl.models import ModelSpec, load_model
    from esamp_pl.prompts import encode_prompts, load_prompts
    from esamp_pl.sites import SitePair

    decode = settings_lib.decode_settings(cfg)
    if decode.esamp is None or not decode.esamp.uses_distiller:
        raise ValueError("the novelty diagnostic needs ESamp with a Distiller (esamp.enabled=true, esamp.mode=esamp)")
    inits = [(name, *parse_init(name)) for name in cfg.inits]
    variants = _variants(cfg)
    settings_lib.apply_threads(cfg.get("threads"))
    prompts = load_prompts(cfg.prompts)
    if cfg.get("limit") is not None:
        prompts = prompts[:cfg.limit]
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model_spec = ModelSpec.from_config(cfg.model)
    loaded = engine = prompt_ids = None
    runs: dict[str, dict[str, dict]] = {}
    for label, overrides in variants:
        runs[label] = {}
        for name, kind, learn in inits:
            settings = _settings_for(decode, overrides, learn)
            key = _run_key(cfg, prompts, settings, name)  # the model name fixes the hidden size
            path = out_dir / f"{label}-{name}.json"
            if path.is_file():
                saved = json.loads(path.read_text())
                if saved.get("key") != key:
                    raise ValueError(f"{path} holds a run with other settings; use another output_dir or delete it")
                runs[label][name] = saved
                continue
            if loaded is None:
                loaded = load_model(model_spec, device=cfg.device)
                prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=model_spec.chat_template,
                                            max_context=loaded.max_context, max_new_tokens=decode.max_new_tokens)
                engine = build_engine(loaded, "eager")  # the observer is an eager-engine feature
            settings = settings_lib.with_hidden_size(settings, loaded.model.config.hidden_size)
            state = initial_distiller_state(kind, loaded_model=loaded, sites=SitePair(model_spec.sites),
                                            distiller_spec=settings.esamp.adapter.distiller,
                                            warm_start_path=cfg.esamp.get("warm_start_path"))
            probe = NoveltyProbe(len(prompts), settings.n, temperature=settings.sampling.temperature)
            result = engine.generate(prompt_ids, settings, initial_state=state, observer=probe)
            record = {"key": key, "label": label, "init": name, **overrides, "updates": result.adapter_stats.updates,
                      "steps": result.steps, "tokens_generated": result.tokens_generated,
                      "decode_seconds": round(result.decode_seconds, 2), "tokens_sha256": _tokens_digest(result),
                      **probe.summary()}
            if result.kl_budget is not None:
                record["kl_budget_stats"] = result.kl_budget.as_dict()
            write_json_atomic(path, record, indent=1)
            log.info("%s %s: spearman %.3f (pooled %.3f), %d updates", label, name, record["spearman"],
                     record["spearman_pooled"], record["updates"])
            runs[label][name] = record
    return _report(cfg, prompts, decode, variants, runs)


def _report(cfg: DictConfig, prompts: list[str], decode: DecodeSettings, variants, runs) -> dict[str, Any]:
    """The JSON report: one entry per init (first variant, e.g. beta 0) and per ``<init>@<variant>``."""
    report: dict[str, Any] = {"model": cfg.model.name, "prompts": len(prompts), "n": decode.n,
                              "max_new_tokens": decode.max_new_tokens, "seed": decode.seed,
                              "sampling": OmegaConf.to_container(cfg.sampling, resolve=True),
                              "variants": [label for label, _ in variants], "inits": {}, "same_tokens": {}}
    for index, (label, overrides) in enumerate(variants):
        records = runs[label]
        report["same_tokens"][label] = len({r["tokens_sha256"] for r in records.values()}) == 1
        reference = records.get("random")
        for name, record in records.items():
            entry = {k: record[k] for k in ("spearman", "spearman_se", "spearman_pooled", "spearman_pooled_se",
                                            "kl_per_step", "abs_dlogit", "updates")}
            # runs saved before the relative signal was measured lack it: shown as undefined
            entry.update({k: record.get(k, math.nan) for k in ("spearman_relative", "spearman_relative_se")})
            entry.update({k: v for k, v in overrides.items() if v is not None})
            if reference is not None and name != "random":
                entry["spearman_minus_random"], entry["spearman_minus_random_se"] = _paired(record, reference)
            twin = records.get(FROZEN_PREFIX + name)
            if twin is not None:
                entry["spearman_minus_frozen"], entry["spearman_minus_frozen_se"] = _paired(record, twin)
            if "kl_budget_stats" in record:
                entry["realised_beta"] = record["kl_budget_stats"]
            report["inits"][name if index == 0 else f"{name}@{label}"] = {k: _finite(v) for k, v in entry.items()}
    return report


def _finite(value):
    """JSON has no nan: undefined statistics become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _paired(record: dict, reference: dict) -> tuple[float, float]:
    """Mean ± s.e. over prompts of the within-step Spearman difference (same prompts, paired)."""
    pairs = [a["spearman"] - b["spearman"] for a, b in zip(record["per_prompt"], reference["per_prompt"])
             if a["spearman"] is not None and b["spearman"] is not None]
    return mean_and_se(pairs)


def format_table(report: dict[str, Any]) -> str:
    """A Markdown table of the report."""
    lines = ["| run | Spearman within step (± s.e.) | pooled (± s.e.) | relative signal, within step (± s.e.) | "
             "vs random (paired s.e.) | vs frozen twin (paired s.e.) | KL/step | mean abs Δlogit | updates |",
             "|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, se=None, digits=3):
        if value is None or (isinstance(value, float) and not math.isfinite(value)):
            return "-"
        text = f"{value:+.{digits}f}" if se is not None else f"{value:.{digits}f}"
        return text + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")

    for name, e in report["inits"].items():
        vs = fmt(e.get("spearman_minus_random"), e.get("spearman_minus_random_se"), 2)
        vs_frozen = fmt(e.get("spearman_minus_frozen"), e.get("spearman_minus_frozen_se"), 2)
        lines.append(f"| {name} | {fmt(e['spearman'], e['spearman_se'], 2)} | "
                     f"{fmt(e['spearman_pooled'], e['spearman_pooled_se'], 2)} | "
                     f"{fmt(e.get('spearman_relative'), e.get('spearman_relative_se'), 2)} | {vs} | {vs_frozen} | "
                     f"{fmt(e['kl_per_step'], None, 4)} | "
                     f"{fmt(e['abs_dlogit'])} | {e['updates']} |")
    return "\n".join(lines)
