"""``scripts/pretrain_distiller.py``: corpus -> hidden-state pairs -> Lightning training -> checkpoint.

:func:`run_pretraining` checks the config, builds the data module (which prepares the pair cache on
rank 0) and the Distiller module, trains with the configured Lightning ``Trainer`` (cpu, gpu, ddp,
fsdp), validates, and writes ``checkpoints/<model>/<sites>-r<rank>.distiller.safetensors``
atomically on rank 0.

Resuming: every ``checkpoint_every`` steps, and on Ctrl-C or a crash, Lightning writes
``<run_dir>/lightning/last.ckpt``; running the same command again continues from it. The run
folder is keyed by everything that shapes the result except the trainer settings (so a run may be
resumed on other devices, or with a larger ``max_steps``). That file is a pickle-based Lightning
checkpoint written by the user's own run and read back only by it; it is still loaded with
``weights_only=True``. Checkpoints meant to be shared are the safetensors export, never this file.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig

from esamp_pl import settings as settings_lib
from esamp_pl.checkpoint import CheckpointMeta, checkpoint_filename, default_checkpoints_dir, save_checkpoint
from esamp_pl.distiller import DistillerSpec
from esamp_pl.models import LoadedModel, ModelSpec, cache_root, load_model
from esamp_pl.pretrain.corpus import DataSpec, pack_documents, read_documents
from esamp_pl.pretrain.datamodule import PairDataModule
from esamp_pl.pretrain.module import DistillerModule
from esamp_pl.pretrain.pairs import PairCache, build_pair_cache
from esamp_pl.pretrain.throughput import PairThroughput
from esamp_pl.sites import SitePair

log = logging.getLogger(__name__)
GPU_ACCELERATORS = ("gpu", "cuda")


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
        raise RuntimeError(
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
        raise RuntimeError(
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


def run_pretraining(cfg: DictConfig, *, callbacks: Sequence[Callback] = (),
                    load: Callable[[], LoadedModel] | None = None) -> Path | None:
    """Pre-train and export a Distiller; returns the checkpoint path (on rank 0), else None.

    ``load`` replaces :func:`load_model` (tests pass tiny in-memory models).
    """
    model_spec = ModelSpec.from_config(cfg.model)
    sites = SitePair(model_spec.sites)
    data = DataSpec.from_config(cfg.data)
    spec = settings_lib.distiller_spec(cfg.distiller)  # validates; hidden size comes from the model
    distiller = {k: v for k, v in dataclasses.asdict(spec).items() if k != "hidden_size"}
    check_hardware(cfg)
    device = extract_device(cfg)
    seed_everything(cfg.seed, workers=True, verbose=False)

    run_dir = run_dir_for(cfg, model_spec, distiller)
    load = load or partial(load_model, model_spec, device=device)
    datamodule = PairDataModule(partial(prepare_pairs, load, data, sites, device, float(cfg.max_cpu_params)),
                                data, run_dir)
    module = DistillerModule(distiller=distiller, optimizer=settings_lib.to_plain(cfg.optimizer),
                             warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio, seed=cfg.seed)
    lightning_dir = run_dir / "lightning"
    trainer = instantiate(
        cfg.trainer, default_root_dir=str(run_dir), logger=CSVLogger(str(run_dir), name="logs"),
        callbacks=[ModelCheckpoint(dirpath=str(lightning_dir), save_last=True, save_top_k=0,
                                   every_n_train_steps=cfg.checkpoint_every),
                   OnExceptionCheckpoint(dirpath=str(lightning_dir), filename="last"), PairThroughput(), *callbacks])
    last = lightning_dir / "last.ckpt"
    if last.is_file() and not cfg.resume:
        log.info("resume=false: starting afresh, removing %s", last)
        last.unlink()
    resume = str(last) if last.is_file() else None
    if resume:
        log.info("resuming from %s", resume)
    with warnings.catch_warnings():
        # With no checkpoint yet, Lightning warns that it looked for one (OnExceptionCheckpoint makes it look).
        warnings.filterwarnings("ignore", message=r".*ckpt_path.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
    if trainer.interrupted:
        log.warning("training was interrupted; run the same command again to resume from %s", last)
        return None
    metrics = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule, verbose=False)[0].items()
               if k.startswith("val/")}
    state = {name.removeprefix("bank."): tensor.detach().cpu()
             for name, tensor in trainer.strategy.lightning_module_state_dict().items() if name.startswith("bank.")}
    if not trainer.is_global_zero:
        return None
    return export(cfg, datamodule.cache, module.spec, state, metrics, trainer.global_step, trainer)


def export(cfg: DictConfig, cache: PairCache, spec: DistillerSpec, state: dict[str, torch.Tensor],
           metrics: dict[str, float], steps: int, trainer) -> Path:
    """Write the trained Distiller with its metadata to ``checkpoints/<model>/...`` (atomically)."""
    manifest = cache.manifest
    folder = Path(cfg.checkpoints_dir).expanduser() if cfg.get("checkpoints_dir") else default_checkpoints_dir()
    path = folder / manifest["model_name"] / checkpoint_filename(manifest["sites"], spec)
    training = {"optimizer": settings_lib.to_plain(cfg.optimizer), "batch_size": cfg.data.batch_size,
                "warmup_steps": cfg.warmup_steps, "min_lr_ratio": cfg.min_lr_ratio, "seed": cfg.seed,
                "devices": trainer.world_size, "precision": str(trainer.precision), "train_rows":
                    trainer.datamodule.train_rows.rows if trainer.datamodule else None}
    meta = CheckpointMeta(model_name=manifest["model_name"], model_id=manifest["model_id"],
                          model_fingerprint=manifest["model_fingerprint"], sites=manifest["sites"],
                          distiller=dataclasses.asdict(spec), corpus=manifest["corpus"], steps=int(steps),
                          metrics=metrics, training=training)
    save_checkpoint(path, {k: state[k] for k in sorted(state)}, meta)
    log.info("wrote %s (val/mse %.4g, random init %.4g; top-1 agreement %.3f, random %.3f)", path,
             metrics.get("val/mse", float("nan")), metrics.get("val/mse_random", float("nan")),
             metrics.get("val/top1_agreement", float("nan")), metrics.get("val/top1_agreement_random", float("nan")))
    return path
