"""A warm start trained for online adaptation: episodes that replay generation, and a Reptile meta-update.

The plain warm start (:mod:`esamp_pl.pretrain.module`) regresses h on s over a corpus: it learns
the generic shallow-to-deep map, so its error at test time is small everywhere, new or not. What
ESamp uses is the error *after* online adaptation to a prompt's own samples. This module trains the
init for that:

* **Episodes** (:func:`write_episodes`): the LM answers seed prompts with n samples each (the
  engine, plain sampling with the generation filters), and for every decode step t >= 1 and sample
  i still running, the (s, h) pair of that very step is kept. Pairs are stored prompt by prompt, in
  decode order, with their prompt, sample and step ids (:mod:`esamp_pl.pretrain.shards`).
* **Inner loop** (:meth:`MetaDistillerModule.adapt`): a :class:`~esamp_pl.adapter.TestTimeAdapter`
  built from the ``esamp`` config (optimizer, scope, rows trained, ``update_every``) is loaded with
  the current init and driven step by step through the project's own updater, exactly as the engine
  drives it at test time: predict, stage, launch.
* **Outer loop**: first-order Reptile. The "gradient" of the init is ``init - mean over prompts of
  the adapted Distillers``; the outer optimizer (``outer_optimizer``, SGD by default) takes the step.

Lightning runs it with manual optimisation, the same trainer configs (cpu, gpu, ddp: each rank
adapts its own prompts and the outer gradient is averaged) and resumes from ``last.ckpt``: the
episode stream is a function of the global step, so a resumed run sees the same episodes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from esamp_pl.adapter import AdapterSpec, TestTimeAdapter
from esamp_pl.async_update import make_updater
from esamp_pl.distiller import DistillerBank, DistillerSpec
from esamp_pl.engine import DecodeSettings
from esamp_pl.files import write_json_atomic
from esamp_pl.optim import AdamSpec
from esamp_pl.pretrain.shards import ShardStore, ShardWriter
from esamp_pl.sampling import SamplingParams
from esamp_pl.sites import SiteCapture, SitePair

log = logging.getLogger(__name__)
FORMAT = "esamp_pl.episodes/1"


@dataclass(frozen=True)
class EpisodeSpec:
    """How the episodes are generated; the ``episodes:`` section of ``conf/pretrain_meta.yaml``."""

    seed_prompts: str | None = None
    "a .json / .txt of seed prompts (see selfgen.py); null: the bundled set (no evaluation-set text)"
    num_prompts: int = 64
    "prompts answered, one episode each"
    val_prompts: int = 8
    "of those, the last ones held out for validation"
    n: int = 8
    "samples per prompt (the rows of an episode, as at generation)"
    max_new_tokens: int = 64
    "tokens per sample (an episode has max_new_tokens - 1 decode steps)"
    temperature: float = 1.0
    min_p: float = 0.1
    seed: int = 0
    "prompt choice and sampling"
    generation_batch_size: int = 8
    "prompts decoded together"
    cache_dtype: str = "float16"
    shard_rows: int = 65536
    "pairs per shard on disk"

    def __post_init__(self) -> None:
        for name in ("num_prompts", "val_prompts", "n", "generation_batch_size", "shard_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"episodes.{name} must be a positive integer, but is {value!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 2:
            raise ValueError(f"episodes.max_new_tokens must be an integer >= 2, but is {self.max_new_tokens!r}")
        if self.val_prompts >= self.num_prompts:
            raise ValueError(f"episodes.val_prompts ({self.val_prompts}) must be below episodes.num_prompts "
                             f"({self.num_prompts}). Fix: answer more prompts or hold out fewer")
        if self.cache_dtype not in ("float16", "float32"):
            raise ValueError(f"episodes.cache_dtype must be float16 or float32, but is {self.cache_dtype!r}")

    @property
    def steps(self) -> int:
        """Decode steps per episode (the first token comes from the prefill and is not trained on)."""
        return self.max_new_tokens - 1


@torch.no_grad()
def write_episodes(model, engine, sites: SitePair, prompt_ids: list[list[int]], spec: EpisodeSpec,
                   writer: ShardWriter) -> list[dict[str, Any]]:
    """Generate ``spec.n`` samples per prompt and add each prompt's decode-step pairs to ``writer``.

    The pairs are the states of the decode steps themselves, read by a second :class:`SiteCapture`
    on the same sites after each step (``on_step``), so they cost no extra forward. ``engine`` must
    run its steps eagerly (the eager engine), so that the hooks fire. Rows of a prompt are
    contiguous, ordered by step then sample. Returns one record per prompt: ``{"prompt", "start",
    "rows"}`` (its row range in the store).
    """
    settings = DecodeSettings(n=spec.n, max_new_tokens=spec.max_new_tokens, seed=spec.seed,
                              sampling=SamplingParams(temperature=spec.temperature, min_p=spec.min_p, top_p=1.0))
    dtype = getattr(torch, spec.cache_dtype)
    episodes = []
    for first in tqdm(range(0, len(prompt_ids), spec.generation_batch_size), desc="episodes", unit="batch"):
        chunk = prompt_ids[first:first + spec.generation_batch_size]
        captured: list[tuple[torch.Tensor, torch.Tensor]] = []
        with SiteCapture(model, sites) as capture:
            def keep(step: int) -> None:
                pair = capture.pop()  # step 0: the prefill's states, neither trained on nor kept
                if step > 0:
                    captured.append((pair[0].to("cpu", dtype), pair[1].to("cpu", dtype)))

            result = engine.generate(chunk, dataclasses.replace(settings, seed=spec.seed + first), on_step=keep)
        if not captured:  # every sample stopped at its first token: no decode step, no pairs
            episodes += [{"prompt": first + done.prompt_index, "start": writer.added, "rows": 0}
                         for done in result.prompts]
            continue
        source, target = torch.stack([c[0] for c in captured]), torch.stack([c[1] for c in captured])  # [t, rows, d]
        for done in result.prompts:
            # A sample runs at decode step t >= 1 while its first t tokens were kept (no stop token among them).
            lengths = torch.tensor([len(s.token_ids) for s in done.samples])
            active = torch.arange(1, len(captured) + 1)[:, None] <= lengths[None, :]  # [steps, n]
            steps, samples = active.nonzero(as_tuple=True)
            rows = done.prompt_index * spec.n + samples
            start = writer.added
            writer.add(source=source[steps, rows], target=target[steps, rows],
                       prompt=torch.full((len(steps),), first + done.prompt_index, dtype=torch.int32),
                       sample=samples.to(torch.int32), step=(steps + 1).to(torch.int32))
            episodes.append({"prompt": first + done.prompt_index, "start": start, "rows": len(steps)})
    return sorted(episodes, key=lambda e: e["prompt"])


def episode_store_key(*, model_fingerprint: str, sites: str, prompts: list[str], spec: EpisodeSpec) -> str:
    blob = json.dumps({"format": FORMAT, "model": model_fingerprint, "sites": sites, "prompts": prompts,
                       "spec": dataclasses.asdict(spec)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def build_episode_store(loaded, sites: SitePair, spec: EpisodeSpec, *, root: Path | None = None) -> ShardStore:
    """The episodes for this model, sites and spec: reused from ``<cache>/episodes/...`` if present, else made."""
    from esamp_pl.decoding import build_engine
    from esamp_pl.models import cache_root
    from esamp_pl.pretrain.corpus import DataSpec
    from esamp_pl.pretrain.selfgen import choose_prompts
    from esamp_pl.prompts import encode_prompts

    prompts = choose_prompts(DataSpec(seed_prompts=spec.seed_prompts, num_prompts=spec.num_prompts, seed=spec.seed))
    if len(prompts) < spec.num_prompts:
        raise ValueError(f"episodes.num_prompts={spec.num_prompts} but the seed prompts hold {len(prompts)}. "
                         "Fix: lower episodes.num_prompts or give more seed prompts")
    key = episode_store_key(model_fingerprint=loaded.fingerprint, sites=sites.preset, prompts=prompts, spec=spec)
    folder = (root or cache_root() / "episodes") / loaded.spec.name / key[:24]
    store = ShardStore.open(folder)
    if store is not None and store.index.get("key") == key:
        log.info("reusing %d episode pairs in %s", store.rows, folder)
        return store
    prompt_ids = encode_prompts(loaded.tokenizer, prompts, chat_template=loaded.spec.chat_template,
                                max_context=loaded.max_context, max_new_tokens=spec.max_new_tokens)
    started = time.perf_counter()
    with ShardWriter(folder, shard_rows=spec.shard_rows) as writer:
        episodes = write_episodes(loaded.model, build_engine(loaded, "eager"), sites, prompt_ids, spec, writer)
        for episode in episodes:
            episode["split"] = "val" if episode["prompt"] >= spec.num_prompts - spec.val_prompts else "train"
        store = writer.close({"key": key, "model_name": loaded.spec.name, "model_id": loaded.spec.name_or_path,
                              "model_fingerprint": loaded.fingerprint,
                              "sites": sites.preset, "hidden_size": int(loaded.model.config.hidden_size),
                              "episode_spec": dataclasses.asdict(spec), "episodes": episodes}, replace=True)
    seconds = time.perf_counter() - started
    log.info("extracted %d episode pairs (%d prompts x %d samples) in %.1f s: %.0f pairs/s", store.rows,
             len(episodes), spec.n, seconds, store.rows / max(seconds, 1e-9))
    return store


def read_episode(store: ShardStore, episode: dict[str, Any], n: int, steps: int) -> tuple[torch.Tensor, ...]:
    """(source [steps, n, d], target [steps, n, d], active [steps, n]) of one episode, zeros where inactive."""
    rows = store.read(episode["start"], episode["start"] + episode["rows"], ["source", "target", "sample", "step"])
    hidden = int(store.index["hidden_size"])
    source = torch.zeros(steps, n, hidden, dtype=rows["source"].dtype)
    target = torch.zeros_like(source)
    active = torch.zeros(steps, n, dtype=torch.bool)
    at = (rows["step"].long() - 1, rows["sample"].long())
    source[at], target[at], active[at] = rows["source"], rows["target"], True
    return source, target, active


def stack_episodes(parts: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """Episodes side by side as one decode batch: rows prompt-major (``p * n + j``), as in the engine."""
    return {name: torch.cat([p[i] for p in parts], dim=1) for i, name in enumerate(("source", "target", "active"))}


class EpisodeStream(IterableDataset):
    """Meta-batches of ``prompts_per_step`` training episodes; batch k is a function of k (resumable).

    Epoch e visits the episodes in a permutation drawn from ``seed + e``; the stream starts at batch
    ``start`` (the resumed global step) and, with DDP, rank r takes batches ``k * world + r``.
    """

    def __init__(self, store: ShardStore, episodes: list[dict[str, Any]], prompts_per_step: int, *, seed: int,
                 start: int = 0, rank: int = 0, world: int = 1) -> None:
        super().__init__()
        if len(episodes) < prompts_per_step * world:
            raise ValueError(f"{len(episodes)} training episodes cannot fill prompts_per_step={prompts_per_step} "
                             f"on {world} device(s). Fix: more episodes.num_prompts or a smaller prompts_per_step")
        self.store, self.episodes, self.prompts_per_step = store, episodes, prompts_per_step
        self.seed, self.start, self.rank, self.world = seed, start, rank, world
        spec = store.index["episode_spec"]
        self.n, self.steps = int(spec["n"]), int(spec["max_new_tokens"]) - 1

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        per_epoch = len(self.episodes) // self.prompts_per_step
        epoch, slot = divmod(k, per_epoch)
        order = torch.randperm(len(self.episodes), generator=torch.Generator().manual_seed(self.seed + epoch))
        chosen = order[slot * self.prompts_per_step:(slot + 1) * self.prompts_per_step].tolist()
        return stack_episodes([read_episode(self.store, self.episodes[i], self.n, self.steps) for i in chosen])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        k = self.start
        while True:
            yield self.batch(k * self.world + self.rank)
            k += 1


class EpisodeDataModule(LightningDataModule):
    """Builds (or finds) the episode store on rank 0 and serves training and validation episodes."""

    def __init__(self, prepare: Callable[[], ShardStore], prompts_per_step: int, seed: int,
                 run_dir: str | Path) -> None:
        super().__init__()
        self.prepare, self.prompts_per_step, self.seed = prepare, prompts_per_step, seed
        self.pointer = Path(run_dir) / "episodes.json"
        self.store: ShardStore | None = None

    def prepare_data(self) -> None:
        if not self.pointer.is_file() or ShardStore.open(json.loads(self.pointer.read_text())["folder"]) is None:
            store = self.prepare()
            self.pointer.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.pointer, {"folder": str(store.folder)})

    def setup(self, stage: str | None = None) -> None:
        if self.store is None:
            folder = json.loads(self.pointer.read_text())["folder"]
            self.store = ShardStore.open(folder)
            if self.store is None:
                raise RuntimeError(f"the episode store {folder} named in {self.pointer} is missing or incomplete; "
                                   "run again to rebuild it")

    def _episodes(self, split: str) -> list[dict[str, Any]]:
        return [e for e in self.store.index["episodes"] if e["split"] == split]

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        stream = EpisodeStream(self.store, self._episodes("train"), self.prompts_per_step, seed=self.seed,
                               start=trainer.global_step if trainer else 0,
                               rank=trainer.global_rank if trainer else 0, world=trainer.world_size if trainer else 1)
        return DataLoader(stream, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        spec = self.store.index["episode_spec"]
        episodes = self._episodes("val")
        parts = [read_episode(self.store, e, int(spec["n"]), int(spec["max_new_tokens"]) - 1) for e in episodes]
        size = min(self.prompts_per_step, len(parts))
        batches = [stack_episodes(parts[i:i + size]) for i in range(0, len(parts) - size + 1, size)]
        return DataLoader(batches, batch_size=None)


def online_spec(adapter: dict[str, Any], distiller: DistillerSpec) -> AdapterSpec:
    """The test-time adapter's settings (the esamp config's optimizer, scope, rows, update cadence)."""
    values = dict(adapter)
    optimizer = dict(values.pop("optimizer", {}) or {})
    if "betas" in optimizer:
        optimizer["betas"] = tuple(optimizer["betas"])
    spec = AdapterSpec(distiller=distiller, optimizer=AdamSpec(**optimizer), **values)
    if not spec.learn:
        raise ValueError("meta pre-training adapts online: esamp.learn must be true")
    return dataclasses.replace(spec, update_mode="sync")  # the same steps, run inline


def replay(spec: AdapterSpec, batch: dict[str, torch.Tensor], n: int, state: dict[str, torch.Tensor], *,
           device: torch.device | str = "cpu") -> TestTimeAdapter:
    """Run a batch of episodes through a fresh test-time adapter started from ``state``, step by step as the
    engine's decode loop drives it (predict, stage, launch); returns the adapted adapter."""
    source, target, active = (batch[k].to(device) for k in ("source", "target", "active"))
    adapter = TestTimeAdapter(spec, source.shape[1] // n, n, device=device, max_steps=source.shape[0])
    adapter.load_initial_state(state)
    updater = make_updater(adapter, "sync", device=torch.device(device))
    # No autocast (a bf16-mixed trainer): the online steps run in float32, as the engine runs them.
    with torch.autocast(device_type=torch.device(device).type, enabled=False):
        try:
            for step in range(source.shape[0]):
                adapter.predict(source[step], for_update=updater.reuses_prediction)
                updater.stage(source[step], target[step], active[step])
                updater.launch()
        finally:
            updater.close()
    return adapter


class MetaDistillerModule(LightningModule):
    """The init of the online Distillers, meta-trained by Reptile over replayed generation episodes."""

    def __init__(self, distiller: dict[str, Any], adapter: dict[str, Any], outer_optimizer: dict[str, Any],
                 seed: int = 0, init_from: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()  # plain dicts: the Lightning checkpoint loads with weights_only=True
        self.automatic_optimization = False
        self.spec: DistillerSpec | None = None
        self.bank: DistillerBank | None = None
        self.online: AdapterSpec | None = None
        self._random: dict[str, torch.Tensor] | None = None
        self._random_val: dict[int, list[float]] = {}
        self._val: list[list[float]] = []
        self.pairs_trained = 0
        "pairs replayed by training steps in this process (with seconds_trained: the training rate)"
        self.seconds_trained = 0.0

    def setup(self, stage: str) -> None:
        if self.bank is not None:
            return
        index = self.trainer.datamodule.store.index
        self.spec = DistillerSpec(**{**self.hparams.distiller, "hidden_size": int(index["hidden_size"])})
        self.online = online_spec(self.hparams.adapter, self.spec)
        self.bank = DistillerBank(self.spec, 1, generator=torch.Generator().manual_seed(self.hparams.seed))
        self._random = self.bank.single_state()
        if self.hparams.init_from:
            self.bank.load_single(load_init(self.hparams.init_from, index, self.spec))

    def adapt(self, batch: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> TestTimeAdapter:
        n = int(self.trainer.datamodule.store.index["episode_spec"]["n"])
        return replay(self.online, batch, n, state, device=self.device)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        started = time.perf_counter()
        adapter = self.adapt(batch, self.bank.single_state())
        optimizer = self.optimizers()
        optimizer.zero_grad()
        with torch.no_grad():
            for param, adapted in zip(self.bank.parameters(), adapter.bank.parameters()):
                # Reptile: move the init toward the mean of the Distillers adapted from it.
                direction = param - adapted.mean(0, keepdim=True)
                param.grad = self.trainer.strategy.reduce(direction, reduce_op="mean")
        optimizer.step()
        stats = adapter.stats()
        pairs, seconds = int(batch["active"].sum()), time.perf_counter() - started
        self.pairs_trained += pairs
        self.seconds_trained += seconds
        self.log_dict({"train/online_relative_error": _mean(stats.relative_error_per_step),
                       "train/online_mse": _mean(stats.loss_per_step),
                       "train/pairs_per_s": pairs / max(seconds, 1e-9)},
                      prog_bar=True, batch_size=pairs)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        curve = self.adapt(batch, self.bank.single_state()).stats().relative_error_per_step
        if batch_idx not in self._random_val:  # the random init's episode never changes
            self._random_val[batch_idx] = self.adapt(batch, self._random).stats().relative_error_per_step
        self._val.append([_mean(curve), _mean(curve[:16]), _mean(self._random_val[batch_idx]),
                          _mean(self._random_val[batch_idx][:16])])

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        means = torch.tensor(self._val, dtype=torch.float64, device=self.device).mean(0)
        means = self.trainer.strategy.reduce(means, reduce_op="mean")
        names = ("online_relative_error", "online_relative_error_first_16", "online_relative_error_random",
                 "online_relative_error_first_16_random")
        self.log_dict({f"val/{name}": float(v) for name, v in zip(names, means.tolist())}, sync_dist=True)
        self._val = []

    def configure_optimizers(self):
        return instantiate(self.hparams.outer_optimizer, _partial_=True, _convert_="all")(params=self.bank.parameters())


def load_init(path: str | Path, index: dict[str, Any], spec: DistillerSpec) -> dict[str, torch.Tensor]:
    """A Distiller checkpoint to start the meta-training from, checked against the episodes' model and sites."""
    from esamp_pl.checkpoint import check_state_shapes, load_checkpoint, validate_checkpoint

    state, meta = load_checkpoint(path)
    validate_checkpoint(meta, model_fingerprint=index["model_fingerprint"], sites=index["sites"], spec=spec, path=path,
                        model_name=index["model_name"])
    check_state_shapes(state, spec, path)
    return state


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def run_dir_for(cfg, model_spec, distiller: dict[str, Any]) -> Path:
    """This run's folder (Lightning checkpoints, logs): keyed by everything but the trainer settings."""
    from esamp_pl import settings as settings_lib
    from esamp_pl.models import cache_root

    if cfg.get("run_dir"):
        return Path(cfg.run_dir).expanduser()
    identity = {"model": dataclasses.asdict(model_spec), "episodes": settings_lib.to_plain(cfg.episodes),
                "distiller": distiller, "esamp": settings_lib.to_plain(cfg.esamp), "seed": cfg.seed,
                "outer_optimizer": settings_lib.to_plain(cfg.outer_optimizer), "init_from": cfg.init_from,
                "prompts_per_step": cfg.prompts_per_step}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / "pretrain_meta" / model_spec.name / f"{model_spec.sites}-r{distiller['rank']}-{key}"


def adapter_settings(esamp_cfg) -> dict[str, Any]:
    """The esamp config's adapter fields (what an episode replays) as a plain dict, validated."""
    from esamp_pl import settings as settings_lib

    values = settings_lib.to_plain(esamp_cfg)
    fields = {f.name for f in dataclasses.fields(AdapterSpec)} - {"distiller"}
    adapter = {k: v for k, v in values.items() if k in fields}
    online_spec(adapter, DistillerSpec(hidden_size=1))  # fails now, before any work, on a bad value
    return adapter


def run_meta_pretraining(cfg, *, callbacks=(), load: Callable[[], Any] | None = None) -> Path | None:
    """Meta-train a Distiller init (``scripts/pretrain_meta.py``); returns the exported checkpoint on rank 0.

    ``load`` replaces :func:`esamp_pl.models.load_model` (tests pass tiny in-memory models).
    """
    import warnings
    from functools import partial

    from lightning.pytorch import seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from esamp_pl import settings as settings_lib
    from esamp_pl.models import ModelSpec, load_model
    from esamp_pl.pretrain.run import StepOnExceptionCheckpoint, check_hardware, extract_device, resume_checkpoint

    model_spec = ModelSpec.from_config(cfg.model)
    sites = SitePair(model_spec.sites)
    episodes = EpisodeSpec(**settings_lib.to_plain(cfg.episodes))
    spec = settings_lib.distiller_spec(cfg.distiller)
    distiller = {k: v for k, v in dataclasses.asdict(spec).items() if k != "hidden_size"}
    adapter = adapter_settings(cfg.esamp)
    if not isinstance(cfg.prompts_per_step, int) or cfg.prompts_per_step < 1:
        raise ValueError(f"prompts_per_step must be a positive integer, but is {cfg.prompts_per_step!r}")
    check_hardware(cfg)
    device = extract_device(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir = run_dir_for(cfg, model_spec, distiller)
    load = load or partial(load_model, model_spec, device=device)
    datamodule = EpisodeDataModule(lambda: build_episode_store(load(), sites, episodes), cfg.prompts_per_step,
                                   cfg.seed, run_dir)
    module = MetaDistillerModule(distiller=distiller, adapter=adapter,
                                 outer_optimizer=settings_lib.to_plain(cfg.outer_optimizer), seed=cfg.seed,
                                 init_from=cfg.init_from)
    lightning_dir = run_dir / "lightning"
    trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=CSVLogger(str(run_dir), name="logs"),
        callbacks=[ModelCheckpoint(dirpath=str(lightning_dir), save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every),
                   StepOnExceptionCheckpoint(dirpath=str(lightning_dir), filename="last"), *callbacks])
    last = lightning_dir / "last.ckpt"
    resume = resume_checkpoint(last, cfg.resume)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*ckpt_path.*")
        # The checkpoint holds the init after the meta step, which is what resuming needs.
        warnings.filterwarnings("ignore", message=r".*manual optimization and every_n_train_steps.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if trainer.interrupted:
        log.warning("training was interrupted; run the same command again to resume from %s", last)
        return None
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
               if k.startswith("val/")}
    if not trainer.is_global_zero:
        return None
    log.info("meta-trained to step %d: %d pairs replayed in %.1f s of training steps: %.0f pairs/s",
             trainer.global_step, module.pairs_trained, module.seconds_trained,
             module.pairs_trained / max(module.seconds_trained, 1e-9))
    return export_meta(cfg, datamodule.store, module, metrics, trainer.global_step)


def export_meta(cfg, store: ShardStore, module: MetaDistillerModule, metrics: dict[str, float],
                steps: int) -> Path:
    """Write the meta-trained init as ``<checkpoints_dir>/<model>/<sites>-r<rank>-meta.distiller.safetensors``.

    The ``-meta`` name never replaces the plain warm start; use it with ``esamp.warm_start_path=``.
    """
    from esamp_pl import settings as settings_lib
    from esamp_pl.checkpoint import SUFFIX, CheckpointMeta, checkpoint_filename, default_checkpoints_dir, save_checkpoint

    index = store.index
    folder = Path(cfg.checkpoints_dir).expanduser() if cfg.get("checkpoints_dir") else default_checkpoints_dir()
    name = checkpoint_filename(index["sites"], module.spec).removesuffix(SUFFIX) + "-meta" + SUFFIX
    spec = index["episode_spec"]
    corpus = {"source": "episodes", "key": index["key"], "prompts": len(index["episodes"]), "n": spec["n"],
              "max_new_tokens": spec["max_new_tokens"], "pairs": index["rows"], "seed_prompts": spec["seed_prompts"]}
    training = {"objective": "meta (reptile)", "outer_optimizer": settings_lib.to_plain(cfg.outer_optimizer),
                "adapter": module.hparams.adapter, "prompts_per_step": cfg.prompts_per_step, "seed": cfg.seed,
                "init_from": cfg.init_from}
    meta = CheckpointMeta(model_name=index["model_name"], model_id=index["model_id"],
                          model_fingerprint=index["model_fingerprint"], sites=index["sites"],
                          distiller=dataclasses.asdict(module.spec), corpus=corpus, steps=int(steps), metrics=metrics,
                          training=training)
    path = save_checkpoint(folder / index["model_name"] / name, module.bank.single_state(), meta)
    log.info("wrote %s (val/online_relative_error %.4g, random init %.4g)", path,
             metrics.get("val/online_relative_error", float("nan")),
             metrics.get("val/online_relative_error_random", float("nan")))
    return path
