"""``scripts/evaluate.py``: one task, several sampling methods, the same problems, seeds and n.

A *method* is a named set of overrides of the ``sampling``, ``esamp`` and ``distiller`` config
groups (the ``methods`` catalogue in ``conf/evaluate.yaml``); ``eval.sweeps`` adds variants of a
method with one key changed (``min_p0.1@T0.7``, ``esamp_random@beta0.1``), so each method *family* draws a
diversity-vs-perplexity curve instead of a single point.

Problems go through the :class:`~esamp_pl.engine.DecodeEngine` in fixed batches of
``eval.batch_prompts``; batch ``b`` of every method uses seed ``seed + b``. After a batch the
samples are graded (graded tasks), scored for diversity (sentence embeddings, per problem) and
perplexity (under the scorer model), and one JSON line per problem is appended to
``<output_dir>/results.jsonl``, then one line with the batch's Distiller loss curve (and, with
``esamp.kl_budget``, the realised beta and KL). A rerun skips every (method, problem) already
written with the same settings, and a partly written batch is decoded again whole (same seed, same
rows), so resumed results equal uninterrupted ones.

``eval.seeds`` (a list) repeats the whole run once per seed ``s`` (batch ``b`` then uses ``s + b``):
every (problem, seed) is one *unit* (its records carry ``"unit": "<problem id>@seed<s>"``), and the
report pairs methods unit by unit. ``eval.seeds: null`` is the single-seed run of ``seed``, whose
records and resume keys are those of earlier versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from esamp_pl import resources
from esamp_pl import settings as settings_lib
from esamp_pl.engine import DecodeSettings, SampleResult
from esamp_pl.static_engine import check_engine
from esamp_pl.evaluation.report import write_report
from esamp_pl.evaluation.stats import SAMPLE_NEUTRAL_ESAMP_KEYS
from esamp_pl.evaluation.results import RESULTS_FILE, RUN_INFO_FILE, append_records, read_records, record_unit
from esamp_pl.evaluation.execution import SANDBOXES, check_sandbox
from esamp_pl.evaluation.metrics import Embedder, diversity_metrics, perplexities_from_ids
from esamp_pl.evaluation.tasks import Problem, grade_many, is_graded, load_task
from esamp_pl.models import LoadedModel, ModelSpec, load_model
from esamp_pl.prompts import encode_prompts
from esamp_pl.sites import SitePair

log = logging.getLogger(__name__)

SWEEP_LABELS = {"sampling.temperature": "T", "esamp.beta": "beta", "esamp.kl_budget": "kl",
                "sampling.min_p": "min_p", "sampling.top_p": "top_p"}
_CONF_DIR = resources.CONF_DIR


@dataclass(frozen=True)
class Method:
    """One sampling method of an evaluation: overrides of the ``sampling``, ``esamp`` and ``distiller`` groups."""

    name: str
    "unique name, e.g. ``min_p0.1`` or ``min_p0.1@T0.7``"
    family: str
    "the catalogue entry it derives from; a family's sweep draws one curve"
    sampling: dict
    "the full sampling settings (base group merged with the method's overrides)"
    esamp: dict
    "the full esamp settings (``enabled: false`` = plain sampling)"
    distiller: dict
    "the full Distiller settings (the run's ``distiller`` group merged with the method's overrides, e.g. its rank)"

    @property
    def uses_esamp(self) -> bool:
        return bool(self.esamp.get("enabled", True))

    @property
    def init(self) -> str | None:
        """Distiller init (random / warm / svd) when a Distiller is used, else None."""
        if not self.uses_esamp or self.esamp.get("mode", "esamp") != "esamp":
            return None
        return settings_lib.esamp_init(self.esamp)


def _number_label(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)


def build_methods(cfg: DictConfig) -> list[Method]:
    """The methods ``eval.methods`` names plus the variants of ``eval.sweeps``, all validated."""
    catalogue = cfg.get("methods") or {}
    base_sampling = OmegaConf.to_container(cfg.sampling, resolve=True)
    base_esamp = OmegaConf.to_container(cfg.esamp, resolve=True)
    base_distiller = OmegaConf.to_container(cfg.distiller, resolve=True)

    def resolve(name: str) -> dict:
        if name not in catalogue:
            raise ValueError(f"unknown method {name!r} in eval.methods/eval.sweeps; defined methods: "
                             f"{sorted(catalogue)} (add one under `methods:` in conf/evaluate.yaml)")
        entry = OmegaConf.to_container(catalogue[name], resolve=True) or {}
        unknown = sorted(set(entry) - {"sampling", "esamp", "distiller"})
        if unknown:
            raise ValueError(f"method {name!r} may only override `sampling`, `esamp` and `distiller`, not {unknown}")
        return {"sampling": {**base_sampling, **(entry.get("sampling") or {})},
                "esamp": {**base_esamp, **(entry.get("esamp") or {})},
                "distiller": {**base_distiller, **(entry.get("distiller") or {})}}

    methods: list[Method] = []
    for name in cfg.eval.methods:
        groups = resolve(name)
        methods.append(Method(name, name, groups["sampling"], groups["esamp"], groups["distiller"]))
    for sweep in cfg.eval.get("sweeps") or []:
        family, key = sweep.get("method"), sweep.get("key", "")
        group, _, field = str(key).partition(".")
        if group not in ("sampling", "esamp") or not field:
            raise ValueError(f"eval.sweeps: key must be `sampling.<field>` or `esamp.<field>`, but is {key!r}")
        label = SWEEP_LABELS.get(key, field)
        for value in sweep.get("values") or []:
            groups = resolve(family)
            groups[group] = {**groups[group], field: value}
            methods.append(Method(f"{family}@{label}{_number_label(value)}", family, groups["sampling"],
                                  groups["esamp"], groups["distiller"]))
    names = [m.name for m in methods]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"method name(s) {duplicates} appear twice (a sweep value repeats a listed method?)")
    for method in methods:
        try:
            decode_settings_for(cfg, method)
        except ValueError as err:
            raise ValueError(f"method {method.name!r}: {err}") from err
    return methods


def decode_settings_for(cfg: DictConfig, method: Method, hidden_size: int | None = None) -> DecodeSettings:
    """The engine settings of one method (``seed`` is the run's; the runner adds the batch index)."""
    settings_lib.esamp_init(method.esamp)
    esamp = settings_lib.esamp_settings(method.esamp, method.distiller) if method.uses_esamp else None
    decode = DecodeSettings(n=cfg.n, max_new_tokens=cfg.eval.max_new_tokens, seed=cfg.seed,
                            sampling=settings_lib.sampling_params(method.sampling), esamp=esamp)
    return settings_lib.with_hidden_size(decode, hidden_size) if hidden_size else decode


def _scoring_settings(cfg: DictConfig) -> dict:
    """Scoring choices that change a record's metrics, listed only when not the default (older keys stay valid)."""
    extra = {}
    if cfg.get("perplexity", True) is False:
        extra["perplexity"] = False
    if cfg.get("embedder") is not None:
        extra["embedder"] = str(cfg.embedder)
    return extra


def warm_start_digest(cfg: DictConfig, method: Method) -> str | None:
    """The SHA-256 recorded in the checkpoint a warm-start method reads, found as the decode will find it.

    It enters the method's resume key, so a checkpoint replaced at the same path (re-trained, or another recipe)
    makes the old records stale instead of mixing them with new ones. None: not a warm start, or no readable
    checkpoint there yet (the method is then skipped, saying why).
    """
    if method.init != "warm":
        return None
    from esamp_pl.checkpoint import CheckpointError
    from esamp_pl.checkpoint_lookup import read_meta

    try:
        path = _warm_start_file(method, ModelSpec.from_config(cfg.model))
    except CheckpointError:
        return None
    meta = read_meta(path)
    return meta.sha256 if meta is not None else None


def _warm_start_file(method: Method, model_spec: ModelSpec) -> Path:
    """The checkpoint a warm-start method's decode reads: its named file, else the one found for the model, the
    sites and the method's own Distiller (its width)."""
    from esamp_pl.checkpoint import warm_start_file

    spec = settings_lib.esamp_settings(method.esamp, method.distiller).adapter.distiller
    return warm_start_file(model_spec.name, SitePair(model_spec.sites).preset, spec,
                           method.esamp.get("warm_start_path"))


def method_key(cfg: DictConfig, method: Method) -> str:
    """Hash of everything that decides a method's samples; records with another key are stale."""
    esamp = {k: v for k, v in method.esamp.items() if k not in SAMPLE_NEUTRAL_ESAMP_KEYS}
    # With eval.seeds each record names its seed in its unit, so adding a seed keeps the others' records.
    seed = cfg.seed if run_seeds(cfg) is None else "per-unit"
    # listed for warm starts only, so that every other method keeps the key it had
    warm_start = {"warm_start_sha256": warm_start_digest(cfg, method)} if method.init == "warm" else {}
    blob = json.dumps({"model": OmegaConf.to_container(cfg.model, resolve=True), "task": cfg.eval.task,
                       "n": cfg.n, "seed": seed, "max_new_tokens": cfg.eval.max_new_tokens,
                       "batch_prompts": cfg.eval.batch_prompts, "sampling": method.sampling,
                       "esamp": esamp if method.uses_esamp else {"enabled": False},
                       "distiller": method.distiller if method.uses_esamp else None, "scorer": cfg.scorer,
                       **_scoring_settings(cfg), **warm_start}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- JSONL


def finished_problems(records: list[dict]) -> set[tuple[str, str, str]]:
    """(method, key, unit) of every problem record already written."""
    return {(r["method"], r["key"], record_unit(r)) for r in records if r.get("kind") == "problem"}


# ----------------------------------------------------------------------------- scorer


class Scorer:
    """Perplexity of each sample under a scorer LM, conditioned on the prompt.

    With the generating model as scorer (``scorer=null``) no pass is needed: the decode loop already
    summed each kept token's log-probability under the LM (``SampleResult.perplexity``). Another scorer
    re-tokenizes prompt (with its own chat template) and completion text and runs one forward pass.
    """

    def __init__(self, loaded: LoadedModel, *, same_as_generator: bool, batch_size: int) -> None:
        self.loaded = loaded
        self.same_as_generator = same_as_generator
        self.batch_size = batch_size
        self.name = loaded.spec.name

    def __call__(self, prompt: str, samples: list[SampleResult], texts: list[str]) -> list[float]:
        if self.same_as_generator:
            return [s.perplexity for s in samples]
        tokenizer = self.loaded.tokenizer
        prompt_ids = encode_prompts(tokenizer, [prompt], chat_template=self.loaded.spec.chat_template,
                                    max_context=self.loaded.max_context, max_new_tokens=1)[0]
        token_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else [] for t in texts]
        return perplexities_from_ids(self.loaded.model, [prompt_ids] * len(token_ids), token_ids,
                                     batch_size=self.batch_size, pad_id=tokenizer.pad_token_id or 0,
                                     bos_id=tokenizer.bos_token_id)


def scorer_spec(name: str) -> ModelSpec:
    """A ``conf/model`` entry by name, else a local folder or hub id."""
    entry = _CONF_DIR / "model" / f"{name}.yaml"
    if entry.is_file():
        return ModelSpec.from_config(OmegaConf.load(entry))
    return ModelSpec(name=Path(str(name)).name or str(name), name_or_path=str(name), chat_template=True)


# ----------------------------------------------------------------------------- the run


def run_seeds(cfg: DictConfig) -> list[int] | None:
    """``eval.seeds`` validated (distinct integers), or None for the single-seed run of ``seed``."""
    seeds = cfg.eval.get("seeds")
    if seeds is None:
        return None
    seeds = list(seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds) or len(set(seeds)) < len(seeds):
        raise ValueError(f"eval.seeds must be null or a non-empty list of distinct integers (e.g. [0, 1, 2]), "
                         f"but is {seeds!r}")
    return seeds


def unit_id(problem_id: str, seed: int, seeds: list[int] | None) -> str:
    """The paired unit of a problem decoded with base seed ``seed``: the problem id itself in a single-seed run."""
    return problem_id if seeds is None else f"{problem_id}@seed{seed}"


def _batches(problems: list[Problem], size: int) -> list[list[Problem]]:
    return [problems[i:i + size] for i in range(0, len(problems), size)]


def _finite_or_none(value: float) -> float | None:
    return value if isinstance(value, float) and math.isfinite(value) else None


def _check_config(cfg: DictConfig) -> None:
    if not isinstance(cfg.eval.batch_prompts, int) or cfg.eval.batch_prompts < 1:
        raise ValueError(f"eval.batch_prompts must be an integer >= 1, but is {cfg.eval.batch_prompts}")
    if cfg.eval.limit is not None and (not isinstance(cfg.eval.limit, int) or cfg.eval.limit < 1):
        raise ValueError(f"eval.limit must be a positive integer or null, but is {cfg.eval.limit}")
    if not cfg.eval.methods and not cfg.eval.get("sweeps"):
        raise ValueError("eval.methods and eval.sweeps are both empty: name at least one method")
    run_seeds(cfg)
    settings_lib.check_threads(cfg.get("threads"))
    check_engine(cfg.get("engine", "eager"))
    sandbox = cfg.get("sandbox", "bwrap")
    if cfg.eval.task == "humaneval" and cfg.get("generate", True):
        check_sandbox(sandbox)  # a missing bubblewrap is told before the model loads
    elif sandbox not in SANDBOXES:
        raise ValueError(f"sandbox must be one of {SANDBOXES}, but is {sandbox!r}")


def run_evaluation(cfg: DictConfig) -> Path:
    """Generate, grade and score every (method, problem) not yet in the results file; write the report.

    Returns the output folder.
    """
    _check_config(cfg)
    methods = build_methods(cfg)  # every method's settings validated before the model loads
    check_compare_pairs(cfg, methods)
    model_spec = ModelSpec.from_config(cfg.model)
    SitePair(model_spec.sites)
    problems = load_task(cfg.eval.task, limit=cfg.eval.limit, seed=cfg.seed, prompts=cfg.eval.get("prompts"))
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / RESULTS_FILE
    done = finished_problems(read_records(results_path))

    seeds = run_seeds(cfg)
    units = [(seed, p) for seed in (seeds or [cfg.seed]) for p in problems]
    keys = {m.name: method_key(cfg, m) for m in methods}
    todo = {m.name: {(seed, p.id) for seed, p in units if (m.name, keys[m.name], unit_id(p.id, seed, seeds)) not in done}
            for m in methods}
    info: dict[str, Any] = {"config": OmegaConf.to_container(cfg, resolve=True), "task": cfg.eval.task,
                            "model": model_spec.name, "n": cfg.n, "seed": cfg.seed, "seeds": seeds,
                            "max_new_tokens": cfg.eval.max_new_tokens, "problems": [p.id for p in problems],
                            "units": [unit_id(p.id, seed, seeds) for seed, p in units],
                            "methods": [{**asdict(m), "key": keys[m.name]} for m in methods], "skipped": {}}
    _write_info(out_dir, info)  # first, so that a report can be drawn from an interrupted run
    if cfg.get("generate", True) and any(todo.values()):
        _generate_all(cfg, model_spec, methods, keys, todo, problems, seeds, results_path, info)
    else:
        info["skipped"] = {m.name: reason for m in methods if todo[m.name] and (reason := _unavailable(m, model_spec))}
    _write_info(out_dir, info)
    if cfg.get("report", True):
        write_report(out_dir)
    return out_dir


def check_compare_pairs(cfg: DictConfig, methods: list[Method]) -> None:
    """``eval.compare``: pairs of this run's method names, whose paired differences the report adds."""
    names = {m.name for m in methods}
    for pair in cfg.eval.get("compare") or []:
        if not (OmegaConf.is_list(pair) or isinstance(pair, (list, tuple))) or len(pair) != 2:
            raise ValueError(f"eval.compare: every entry must be a pair [method, method], but one is {pair!r}")
        unknown = [name for name in pair if name not in names]
        if unknown:
            raise ValueError(f"eval.compare: {unknown} not among this run's methods (eval.methods and the sweeps' "
                             f"variants, e.g. esamp_random@kl0.1): {sorted(names)}")


def _write_info(out_dir: Path, info: dict) -> None:
    (out_dir / RUN_INFO_FILE).write_text(json.dumps(info, indent=2, default=str))


def _unavailable(method: Method, model_spec: ModelSpec) -> str | None:
    """Why a warm-start method cannot run, told without loading the model (report-only runs)."""
    if method.init != "warm" or method.esamp.get("warm_start_path"):
        return None
    from esamp_pl.checkpoint import CheckpointError

    try:
        _warm_start_file(method, model_spec)
    except CheckpointError as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"
    return None


def _generate_all(cfg, model_spec: ModelSpec, methods, keys, todo, problems, seeds, results_path, info) -> None:
    from esamp_pl.checkpoint import CheckpointError
    from esamp_pl.decoding import build_engine, initial_distiller_state

    settings_lib.apply_threads(cfg.get("threads"))
    loaded = load_model(model_spec, device=cfg.device)
    hidden = loaded.model.config.hidden_size
    engine = build_engine(loaded, cfg.get("engine", "eager"), cuda_graphs=cfg.get("cuda_graphs", True))
    if not cfg.get("perplexity", True):
        scorer = None
    elif cfg.scorer is None:
        scorer = Scorer(loaded, same_as_generator=True, batch_size=cfg.scorer_batch_size)
    else:
        scorer = Scorer(load_model(scorer_spec(cfg.scorer), device=cfg.device), same_as_generator=False,
                        batch_size=cfg.scorer_batch_size)
    embedder = Embedder(cfg.embedder, device="cpu")
    index = {p.id: i for i, p in enumerate(problems)}
    batches = _batches(problems, cfg.eval.batch_prompts)

    # Initial Distiller weights per method; a method whose init is unavailable is skipped, with the reason.
    runnable: list[tuple[Method, DecodeSettings, Any]] = []
    for method in methods:
        if not todo[method.name]:
            continue
        decode = decode_settings_for(cfg, method, hidden)
        try:
            initial = initial_distiller_state(OmegaConf.create({"esamp": method.esamp}), loaded, decode)
        except (CheckpointError, ValueError) as err:  # no/unfitting checkpoint, or no FFN for svd
            reason = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            info["skipped"][method.name] = reason
            log.warning("skipping method %s: %s", method.name, reason)
            continue
        runnable.append((method, decode, initial))

    # Seeds, then batches outside, methods inside: after an interruption every method has the same
    # units done, so a partial run is still a like-for-like comparison.
    total = sum(len(todo[m.name]) for m, _, _ in runnable)
    bar = tqdm(total=total, desc=f"{cfg.eval.task}: units x methods", unit="problem",
               disable=not cfg.progress)
    try:
        for seed in seeds or [cfg.seed]:
            for b, batch in enumerate(batches):
                for method, decode, initial in runnable:
                    missing = {p.id for p in batch if (seed, p.id) in todo[method.name]}
                    if not missing:
                        continue
                    bar.set_postfix_str(f"seed {seed} batch {b + 1}/{len(batches)} {method.name}")
                    records = _run_batch(cfg, engine, loaded, scorer, embedder, method, keys[method.name], decode,
                                         initial, batch, b, index, missing, seed, seeds)
                    append_records(results_path, records)
                    bar.update(len(missing))
    finally:
        bar.close()


def _run_batch(cfg, engine, loaded, scorer, embedder, method: Method, key: str, decode: DecodeSettings,
               initial, batch: list[Problem], batch_index: int, index: dict, missing: set, base_seed: int,
               seeds: list[int] | None) -> list[dict]:
    """Decode one batch of problems with seed ``base_seed + batch_index``, grade and score it; the JSON lines."""
    tokenizer = loaded.tokenizer
    prompt_ids = encode_prompts(tokenizer, [p.prompt for p in batch], chat_template=loaded.spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=decode.max_new_tokens)
    settings = replace(decode, seed=base_seed + batch_index)
    result = engine.generate(prompt_ids, settings, initial_state=initial)
    common = {"method": method.name, "family": method.family, "key": key, "task": cfg.eval.task,
              "model": loaded.spec.name, "n": cfg.n, "seed": settings.seed, "max_new_tokens": decode.max_new_tokens}
    if seeds is not None:
        common["base_seed"] = base_seed
    records: list[dict] = []
    for done in sorted(result.prompts, key=lambda r: r.prompt_index):
        problem = batch[done.prompt_index]
        if problem.id not in missing:
            continue
        ids = [s.token_ids for s in done.samples]
        texts = [tokenizer.decode(t, skip_special_tokens=True) for t in ids]
        correct = (grade_many(problem, texts, timeout=cfg.eval.grade_timeout, workers=cfg.grade_workers,
                              sandbox=cfg.get("sandbox", "bwrap"))
                   if is_graded(problem.task) else None)
        ppl = (scorer(problem.prompt, done.samples, texts) if scorer is not None
               else [math.nan] * len(ids))
        diversity = {k: _finite_or_none(float(v)) for k, v in diversity_metrics(texts, embedder).items()}
        samples = [{"text": text, "num_tokens": len(t), "finish_reason": s.finish_reason,
                    "perplexity": _finite_or_none(p), "correct": None if correct is None else bool(correct[j])}
                   for j, (text, t, s, p) in enumerate(zip(texts, ids, done.samples, ppl))]
        unit = {} if seeds is None else {"unit": unit_id(problem.id, base_seed, seeds)}
        records.append({"kind": "problem", **common, **unit, "problem_id": problem.id,
                        "problem_index": index[problem.id],
                        "num_correct": None if correct is None else int(sum(correct)),
                        "diversity": diversity, "scorer": scorer.name if scorer else None, "samples": samples})
    stats = result.adapter_stats
    records.append({"kind": "batch", **common, "batch_index": batch_index, "problem_ids": [p.id for p in batch],
                    "tokens_generated": result.tokens_generated, "decode_seconds": round(result.decode_seconds, 3),
                    "decode_steps": result.steps, "init": method.init,
                    "distiller_updates": stats.updates if stats else None,
                    "skipped_updates": stats.skipped_nonfinite if stats else None,
                    "loss_per_step": stats.loss_per_step if stats else None,
                    "relative_error_per_step": stats.relative_error_per_step if stats else None,
                    "kl_budget": result.kl_budget.as_dict() if result.kl_budget is not None else None})
    return records


__all__ = ["Method", "build_methods", "decode_settings_for", "method_key", "read_records", "run_evaluation",
           "record_unit", "run_seeds", "unit_id", "check_compare_pairs", "RESULTS_FILE", "RUN_INFO_FILE"]
