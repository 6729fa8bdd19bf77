"""``scripts/pretrain_distiller.py``: corpus -> hidden-state pairs -> Lightning training -> checkpoint.

:func:`run_pretraining` checks the config, builds the data module (which prepares the pair cache on
rank 0) and the Distiller module, trains with the configured Lightning ``Trainer`` (cpu, gpu, ddp,
fsdp), validates, and writes ``<export.dir>/<model>/<sites>-r<rank>.distiller.safetensors``
atomically on rank 0; ``export.dir`` defaults to ``<run_dir>/export``. The checkpoints shipped in
``checkpoints/`` are read-only inputs: an existing file outside the run folder is only replaced
with ``export.overwrite=true`` (checked before any work).

Resuming: every ``checkpoint_every`` steps, at the end, and on Ctrl-C, SIGTERM or a crash, Lightning
writes ``<run_dir>/lightning/last.ckpt``; running the same command again continues from it (a
completed run is not retrained, and a larger ``trainer.max_steps`` continues it). Ctrl-C and SIGTERM
end with :class:`~esamp_pl.errors.Interrupted` (exit status 130 / 143 from the script) saying so. The
run folder is keyed by everything that shapes the result except the trainer settings (so a run may
be resumed on other devices, or with a larger ``max_steps``), and locked while a run uses it: a
second run with the same settings is refused instead of sharing it. That file is a pickle-based Lightning
checkpoint written by the user's own run and read back only by it; it is still loaded with
``weights_only=True``. Checkpoints meant to be shared are the safetensors export, never this file.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import warnings
from contextlib import contextmanager
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from esamp_pl import settings as settings_lib
from esamp_pl.checkpoint import CheckpointMeta, checkpoint_filename, default_checkpoints_dir, save_checkpoint
from esamp_pl.config_dict import check_keys
from esamp_pl.distiller import DistillerSpec
from esamp_pl.errors import ConfigError, Interrupted, SetupError
from esamp_pl.files import cache_root, exclusive_lock, finite_or_none
from esamp_pl.models import LoadedModel, ModelSpec, load_model
from esamp_pl.pretrain.corpus import DataSpec, pack_documents, read_documents
from esamp_pl.pretrain.datamodule import PairDataModule
from esamp_pl.pretrain.module import DistillerModule
from esamp_pl.pretrain.pairs import PairCache, build_pair_cache
from esamp_pl.pretrain.throughput import PairThroughput
from esamp_pl.sites import SitePair

log = logging.getLogger(__name__)
GPU_ACCELERATORS = ("gpu", "cuda")
TOP_LEVEL_KEYS = ("model", "data", "trainer", "distiller", "seed", "optimizer", "warmup_steps", "min_lr_ratio",
                  "extract_device", "max_cpu_params", "checkpoint_every", "resume", "run_dir", "export")


def extract_device(cfg: DictConfig) -> str:
    """Where the frozen LM runs: ``extract_device``, else the GPU when the trainer uses one, else cpu."""
    if cfg.get("extract_device"):
        return str(cfg.extract_device)
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in GPU_ACCELERATORS or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def check_hardware(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without CUDA fails here, before any work, saying what is missing."""
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in GPU_ACCELERATORS and not torch.cuda.is_available():
        raise SetupError(
            f"trainer.accelerator={accelerator} needs a CUDA GPU, but torch sees none (torch {torch.__version__}, "
            f"CUDA build: {torch.version.cuda or 'no'}). Fix: run on a machine with a GPU and a CUDA build of "
            "torch, or use trainer=cpu (practical only for small models such as smollm2-135m)")


def run_dir_for(cfg: DictConfig, model_spec: ModelSpec, distiller: dict[str, Any]) -> Path:
    """The folder of this run's Lightning checkpoints and logs (stable across restarts)."""
    if cfg.get("run_dir"):
        return Path(cfg.run_dir).expanduser()
    identity = {"model": dataclasses.asdict(model_spec), "data": settings_lib.to_plain(cfg.data),
                "distiller": distiller, "optimizer": settings_lib.to_plain(cfg.optimizer),
                "warmup_steps": cfg.warmup_steps, "min_lr_ratio": cfg.min_lr_ratio, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return cache_root() / "pretrain" / model_spec.name / f"{model_spec.sites}-r{distiller['rank']}-{key}"


def prepare_pairs(load: Callable[[], LoadedModel], data: DataSpec, sites: SitePair, device: str,
                  max_cpu_params: float) -> PairCache:
    """Load the LM, read and pack the corpus, and build (or reuse) the pair cache."""
    loaded = load()
    params = sum(p.numel() for p in loaded.model.parameters())
    if torch.device(device).type == "cpu" and params > max_cpu_params:
        raise SetupError(
            f"model {loaded.spec.name!r} has {params / 1e9:.1f}B parameters; running it over a corpus on the CPU "
            f"would take days (limit max_cpu_params={max_cpu_params:.0e}). Fix: run on a machine with a GPU "
            "with trainer=gpu (or ddp / fsdp)")
    documents = read_documents(data, loaded)
    corpus = pack_documents(loaded.tokenizer, documents, data)
    log.info("corpus %s: %d documents, %d windows of %d tokens, %d pairs", data.label, corpus.documents,
             corpus.meta["windows"], data.window, corpus.meta["pairs"])
    cache, reused = build_pair_cache(loaded, sites, corpus, cache_dtype=data.cache_dtype,
                                     batch_size=data.extract_batch_size, device=device)
    log.info("%s hidden-state pairs in %s", "reusing" if reused else "wrote", cache.folder)
    del loaded
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return cache


class StepOnExceptionCheckpoint(OnExceptionCheckpoint):
    """Lightning's on-exception checkpoint, written only once a training step has been taken.

    A run stopped while it still prepares its data (a corpus, episodes) has no training state yet: the
    module's Distiller is built in ``setup``. Saved then, the checkpoint would hold no weights, and
    the next run would fail to resume from it instead of starting afresh.
    """

    def on_exception(self, trainer, *args, **kwargs) -> None:
        if trainer.global_step > 0:
            super().on_exception(trainer, *args, **kwargs)


class KeptOnExceptionCheckpoint(StepOnExceptionCheckpoint):
    """The on-exception checkpoint, minus Lightning's teardown, which deletes the file after a clean run.

    It writes the same ``last.ckpt`` as the periodic checkpoint; keeping it lets a completed run be
    continued with a larger ``trainer.max_steps``, and an identical re-run reuse it instead of retraining.
    """

    def teardown(self, trainer, *args, **kwargs) -> None:
        pass


EXPORT_KEYS = ("dir", "overwrite")


def export_path(cfg: DictConfig, run_dir: Path, model_name: str, sites: str, spec: DistillerSpec) -> Path:
    """Where the trained Distiller goes; refuses (before any work) to replace a file outside the run folder."""
    export = cfg.get("export") or {}
    check_keys(export, EXPORT_KEYS, "export")
    overwrite = export.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise ConfigError(f"export.overwrite must be true or false, but is {overwrite!r}")
    folder = Path(str(export["dir"])).expanduser() if export.get("dir") else run_dir / "export"
    path = folder / model_name / checkpoint_filename(sites, spec)
    own = path.resolve().is_relative_to(run_dir.resolve())
    if path.exists() and not own and not overwrite:
        shipped = path.resolve().is_relative_to(default_checkpoints_dir().resolve())
        what = "a checkpoint shipped with esamp_pl" if shipped else "an existing checkpoint"
        raise ConfigError(f"export target {path} is {what}; it is not replaced. Fix: pass export.overwrite=true to "
                          "replace it, or export.dir=<another folder> (default: the run folder)")
    return path


def resume_checkpoint(last: Path, resume: bool) -> str | None:
    """The ``last.ckpt`` to resume from, or None to start afresh.

    ``resume=false`` removes it. A torn one (killed while writing) is named with its path and the way
    out, before training. One saved before the first step (by an earlier version, when a run stopped
    while preparing its data) holds no training state: it is removed, and the run starts afresh.
    """
    if not last.is_file():
        return None
    if not resume:
        log.info("resume=false: starting afresh, removing %s", last)
        last.unlink()
        return None
    try:
        state = torch.load(last, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a short or garbled file
        raise ConfigError(f"the resume checkpoint {last} cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'unreadable'}); it is probably torn (the run "
                          "was killed while writing it). Fix: run again with resume=false to start afresh, or delete "
                          "it") from err
    if not state.get("global_step"):
        log.info("%s was saved before the first training step (nothing to resume): starting afresh", last)
        last.unlink()
        return None
    log.info("resuming from %s", last)
    return str(last)


@contextmanager
def lightning_handles_sigterm() -> Iterator[None]:
    """During ``fit``, SIGTERM is left to Lightning (stop after the batch, save last.ckpt), not to our handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _is_first_local_process() -> bool:
    """False in the processes Lightning's DDP launcher starts for ranks > 0 (the first one holds the lock)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def run_pretraining(cfg: DictConfig, *, callbacks: Sequence[Callback] = (),
                    load: Callable[[], LoadedModel] | None = None) -> Path | None:
    """Pre-train and export a Distiller; returns the checkpoint path (on rank 0), else None.

    ``load`` replaces :func:`load_model` (tests pass tiny in-memory models).
    """
    check_keys(settings_lib.to_plain(cfg), TOP_LEVEL_KEYS, "")
    model_spec = ModelSpec.from_config(cfg.model)
    sites = SitePair(model_spec.sites)
    data = DataSpec.from_config(cfg.data)
    spec = settings_lib.distiller_spec(cfg.distiller)  # validates; hidden size comes from the model
    distiller = {k: v for k, v in dataclasses.asdict(spec).items() if k != "hidden_size"}
    check_hardware(cfg)
    device = settings_lib.check_device(extract_device(cfg), "extract_device")
    seed_everything(cfg.seed, workers=True, verbose=False)

    run_dir = run_dir_for(cfg, model_spec, distiller)
    target = export_path(cfg, run_dir, model_spec.name, sites.preset, spec)
    if not _is_first_local_process():
        return _train_and_export(cfg, callbacks, load, model_spec, sites, data, distiller, device, run_dir, target)
    with exclusive_lock(run_dir / ".lock", f"the run folder {run_dir}"):
        return _train_and_export(cfg, callbacks, load, model_spec, sites, data, distiller, device, run_dir, target)


def _train_and_export(cfg: DictConfig, callbacks: Sequence[Callback], load: Callable[[], LoadedModel] | None,
                      model_spec: ModelSpec, sites: SitePair, data: DataSpec, distiller: dict[str, Any], device: str,
                      run_dir: Path, target: Path) -> Path | None:
    load = load or partial(load_model, model_spec, device=device)
    datamodule = PairDataModule(partial(prepare_pairs, load, data, sites, device, float(cfg.max_cpu_params)),
                                data, run_dir)
    module = DistillerModule(distiller=distiller, optimizer=settings_lib.to_plain(cfg.optimizer),
                             warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed)
    setup_check = bool(cfg.trainer.get("fast_dev_run", False))  # its checkpoints must not be resumed by a real run
    lightning_dir = run_dir / ("lightning-fast-dev-run" if setup_check else "lightning")
    trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=CSVLogger(str(run_dir), name="logs"),
        callbacks=[ModelCheckpoint(dirpath=str(lightning_dir), save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every),
                   KeptOnExceptionCheckpoint(dirpath=str(lightning_dir), filename="last"), PairThroughput(),
                   *callbacks])
    last = lightning_dir / "last.ckpt"
    resume = resume_checkpoint(last, cfg.resume)
    hint = f"{last} keeps it; run the same command again to resume"
    try:
        with warnings.catch_warnings(), lightning_handles_sigterm():
            # With no checkpoint yet, Lightning warns that it looked for one (OnExceptionCheckpoint makes it look).
            warnings.filterwarnings("ignore", message=r".*ckpt_path.*")
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    except SIGTERMException as stop:  # Lightning stopped after the batch and saved last.ckpt
        raise Interrupted(f"pre-training stopped at step {trainer.global_step}; {hint}", signal.SIGTERM) from stop
    except SystemExit as stop:  # Lightning turns Ctrl-C into sys.exit(1) after saving last.ckpt
        if trainer.interrupted:
            raise Interrupted(f"pre-training stopped at step {trainer.global_step}; {hint}", signal.SIGINT) from stop
        raise
    if setup_check:
        if trainer.is_global_zero:
            shutil.rmtree(lightning_dir, ignore_errors=True)
    else:
        trainer.save_checkpoint(str(last))  # the final state too, so a larger max_steps continues from here
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
               if k.startswith("val/")}
    state = {name.removeprefix("bank."): tensor.detach().cpu()
             for name, tensor in trainer.strategy.lightning_module_state_dict().items() if name.startswith("bank.")}
    if not trainer.is_global_zero:
        return None
    return export(cfg, datamodule.cache, module.spec, state, metrics, trainer.global_step, trainer, target)


def export(cfg: DictConfig, cache: PairCache, spec: DistillerSpec, state: dict[str, torch.Tensor],
           metrics: dict[str, float], steps: int, trainer, path: Path) -> Path:
    """Write the trained Distiller with its metadata to ``path`` (atomically; see :func:`export_path`)."""
    manifest = cache.manifest
    training = {"optimizer": settings_lib.to_plain(cfg.optimizer), "batch_size": cfg.data.batch_size,
                "warmup_steps": cfg.warmup_steps, "min_lr_ratio": cfg.min_lr_ratio, "seed": cfg.seed,
                "devices": trainer.world_size, "precision": str(trainer.precision), "train_rows":
                    trainer.datamodule.train_rows.rows if trainer.datamodule else None}
    meta = CheckpointMeta(model_name=manifest["model_name"], model_id=manifest["model_id"],
                          model_fingerprint=manifest["model_fingerprint"], sites=manifest["sites"],
                          distiller=dataclasses.asdict(spec), corpus=manifest["corpus"], steps=int(steps),
                          metrics={k: finite_or_none(v) for k, v in metrics.items()}, training=training)
    save_checkpoint(path, {k: state[k] for k in sorted(state)}, meta)
    log.info("wrote %s (val/mse %.4g, random init %.4g; top-1 agreement %.3f, random %.3f)", path,
             metrics.get("val/mse", float("nan")), metrics.get("val/mse_random", float("nan")),
             metrics.get("val/top1_agreement", float("nan")), metrics.get("val/top1_agreement_random", float("nan")))
    return path
