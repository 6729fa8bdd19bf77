"""Pre-trained Distiller checkpoints: one Distiller's weights as safetensors, with metadata.

A checkpoint is only useful for the model and site pair it was trained on, so its safetensors
header carries a JSON record (:class:`CheckpointMeta`) that says which: model id and config
fingerprint, sites, hidden size and Distiller architecture, plus how it was trained (corpus,
steps, validation loss). Loading checks the file is whole and unaltered (a SHA-256 of tensors and
metadata is stored in the header) and :func:`validate_checkpoint` checks it fits the running model; every failure is a
:class:`CheckpointError` that says what is wrong and how to fix it.

safetensors holds raw tensors and a JSON header only: loading a checkpoint never unpickles, so a
file received from someone else cannot run code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from esamp_pl import resources
from esamp_pl.distiller import DistillerSpec
from esamp_pl.errors import UserError
from esamp_pl.files import atomic_path, dumps_json

FORMAT = "esamp_pl.distiller/1"
META_KEY = "esamp_pl"
SUFFIX = ".distiller.safetensors"
ARCHITECTURE_FIELDS = ("hidden_size", "rank", "num_blocks", "output_norm", "norm_eps")
"DistillerSpec fields that change the network's function (init_std and gate_bias only seed it)"

PRETRAIN_HINT = "python scripts/pretrain_distiller.py model={model} model.sites={sites} distiller.rank={rank}"


class CheckpointError(UserError):
    """A Distiller checkpoint cannot be used; the message names the fix."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint exists where one was looked for."""


class CheckpointCorruptError(CheckpointError):
    """The file is not a whole, untouched esamp_pl Distiller checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint was trained for another model, site pair or architecture."""


def package_version() -> str:
    """Installed esamp_pl version (recorded in every checkpoint)."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("esamp_pl")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class CheckpointMeta:
    """What a Distiller checkpoint was trained for and how; stored as JSON in the safetensors header."""

    model_name: str
    "config name of the LM (``conf/model/<name>.yaml``), used to find the checkpoint"
    model_id: str
    "hub id or local path (and GGUF file) the LM was loaded from"
    model_fingerprint: str
    "hash of the LM's config (see ``esamp_pl.models.model_fingerprint``); must match at load"
    sites: str
    "site preset (``paper`` or ``tllm``)"
    distiller: dict[str, Any]
    "the DistillerSpec as a dict (hidden size, rank, blocks, output norm...)"
    corpus: dict[str, Any] = field(default_factory=dict)
    "corpus name, key and size in tokens"
    steps: int = 0
    "optimizer steps of pre-training"
    metrics: dict[str, float] = field(default_factory=dict)
    "validation metrics: val/mse, val/mse_random (the random init), val/top1_agreement..."
    training: dict[str, Any] = field(default_factory=dict)
    "optimizer, batch size, devices, precision, seed of the pre-training run"
    package_version: str = field(default_factory=package_version)
    format: str = FORMAT
    sha256: str = ""
    "over the tensors and the rest of this record; set by :func:`save_checkpoint`, checked on load"

    @property
    def hidden_size(self) -> int:
        return int(self.distiller["hidden_size"])

    def distiller_spec(self) -> DistillerSpec:
        names = {f.name for f in dataclasses.fields(DistillerSpec)}
        return DistillerSpec(**{k: v for k, v in self.distiller.items() if k in names})

    def to_json(self) -> str:
        return dumps_json(dataclasses.asdict(self), sort_keys=True, ensure_ascii=True)  # the checksum hashes it

    @classmethod
    def from_json(cls, text: str) -> "CheckpointMeta":
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        missing = {"model_name", "model_id", "model_fingerprint", "sites", "distiller"} - data.keys()
        if missing:
            raise ValueError(f"metadata lacks {sorted(missing)}")
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_filename(sites: str, spec: DistillerSpec) -> str:
    """File name of the checkpoint for a site pair and architecture, e.g. ``paper-r64.distiller.safetensors``."""
    blocks = f"-b{spec.num_blocks}" if spec.num_blocks != 1 else ""
    norm = "" if spec.output_norm else "-nonorm"
    return f"{sites}-r{spec.rank}{blocks}{norm}{SUFFIX}"


def default_checkpoints_dir() -> Path:
    """Where a newly pre-trained Distiller goes: the repository's ``checkpoints/`` in a source checkout (beside
    the shipped ones), else the user folder (``esamp_pl.resources``), never the installed package."""
    return resources.new_checkpoints_dir()


def content_digest(state: dict[str, torch.Tensor], meta: CheckpointMeta) -> str:
    """SHA-256 over the metadata (but its own field) and the tensors' names, dtypes, shapes and bytes."""
    digest = hashlib.sha256(dataclasses.replace(meta, sha256="").to_json().encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, torch.Tensor], meta: CheckpointMeta) -> Path:
    """Write ``state`` (one Distiller, leading dim 1) and ``meta`` to ``path`` atomically.

    The file is written under a temporary name in the same folder and moved into place
    (:func:`esamp_pl.files.atomic_path`), so a reader never sees a half-written checkpoint, even if
    the writer dies. Non-finite weights are refused: such a Distiller would silently turn ESamp off.
    """
    path = Path(path)
    tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in state.items()}
    bad = non_finite_tensors(tensors)
    if bad:
        raise ValueError(f"refusing to save a Distiller with non-finite weights in {bad} (training diverged?)")
    meta = dataclasses.replace(meta, sha256=content_digest(tensors, meta))
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: meta.to_json(), "format": "pt"})
    return path


def non_finite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN or infinity."""
    return sorted(name for name, tensor in state.items()
                  if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """Read a checkpoint; raise :class:`CheckpointError` if it is missing, truncated or altered."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointNotFoundError(
            f"Distiller checkpoint {path} is a directory; pass the *.distiller.safetensors file inside it as "
            "esamp.warm_start_path=")
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"Distiller checkpoint {path} does not exist; pass an existing file as esamp.warm_start_path= "
            "or create one with scripts/pretrain_distiller.py")
    fix = f"delete {path} and re-create it with scripts/pretrain_distiller.py (or restore the shipped file)"
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error type for a bad header or short file
        raise CheckpointCorruptError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                                     f"{err}. Fix: {fix}") from err
    if META_KEY not in header:
        raise CheckpointCorruptError(f"{path} is a safetensors file but not an esamp_pl Distiller checkpoint "
                                     f"(no {META_KEY!r} metadata). Fix: {fix}")
    try:
        meta = CheckpointMeta.from_json(header[META_KEY])
    except (ValueError, TypeError) as err:
        raise CheckpointCorruptError(f"{path} has unreadable esamp_pl metadata ({err}). Fix: {fix}") from err
    if meta.format != FORMAT:
        raise CheckpointCorruptError(f"{path} has format {meta.format!r}, this esamp_pl reads {FORMAT!r}. "
                                     f"Fix: {fix}")
    found = content_digest(state, meta)
    if found != meta.sha256:
        raise CheckpointCorruptError(
            f"{path}: the weights or metadata do not match the checksum it was written with (expected sha256 "
            f"{meta.sha256[:16]}..., found {found[:16]}...): the file was altered. Fix: {fix}")
    bad = non_finite_tensors(state)
    if bad:
        raise CheckpointCorruptError(
            f"{path} holds NaN or infinite weights in {bad}: ESamp would silently become plain sampling. "
            f"Fix: {fix}")
    return state, meta


def validate_checkpoint(meta: CheckpointMeta, *, model_fingerprint: str, sites: str, spec: DistillerSpec,
                        path: str | Path = "checkpoint", model_name: str | None = None) -> None:
    """Check a checkpoint fits the running model, sites and Distiller; name expected vs found if not.

    ``model_name`` is the running model's config name, for the fix (pre-train one for *this* model).
    """
    hint = PRETRAIN_HINT.format(model=model_name or meta.model_name, sites=sites, rank=spec.rank)
    problems = []
    if meta.hidden_size != spec.hidden_size:
        problems.append(f"hidden size: expected {spec.hidden_size}, found {meta.hidden_size}")
    if meta.model_fingerprint != model_fingerprint:
        problems.append(f"model fingerprint: expected {model_fingerprint} (the loaded model), found "
                        f"{meta.model_fingerprint} (trained for {meta.model_id})")
    if meta.sites != sites:
        problems.append(f"sites: expected {sites!r}, found {meta.sites!r}")
    for name in ARCHITECTURE_FIELDS[1:]:
        expected, found = getattr(spec, name), meta.distiller.get(name)
        if found != expected:
            problems.append(f"distiller.{name}: expected {expected!r}, found {found!r}")
    if problems:
        raise CheckpointMismatchError(
            f"Distiller checkpoint {path} does not fit this run: " + "; ".join(problems)
            + f". Fix: use a checkpoint made for this model and settings, or pre-train one (`{hint}`) and pass the "
            "file it writes as esamp.warm_start_path=")


def check_state_shapes(state: dict[str, torch.Tensor], spec: DistillerSpec, path: str | Path) -> None:
    """The tensors must be exactly those of a bank of one Distiller of ``spec``."""
    from esamp_pl.distiller import DistillerBank
    expected = {name: tuple(p.shape) for name, p in DistillerBank(spec, 1, device="meta").named_parameters()}
    found = {name: tuple(t.shape) for name, t in state.items()}
    if expected != found:
        raise CheckpointCorruptError(f"{path}: tensors {found} do not match the architecture in its metadata "
                                     f"({expected}). Fix: re-create it with scripts/pretrain_distiller.py")


def warm_start_file(model_name: str, sites: str, spec: DistillerSpec, warm_start_path: str | Path | None = None,
                    checkpoints_dir: str | Path | None = None) -> Path:
    """The checkpoint a warm start reads: the file named, else the one found for this model, sites and width.

    One rule for the decode (``esamp_pl.init``) and for whoever must know the file beforehand (the
    evaluation's resume keys). Raises :class:`CheckpointNotFoundError` when none is found.
    """
    if warm_start_path:
        return Path(warm_start_path)
    return find_checkpoint(model_name, sites, checkpoints_dir, spec=spec)


def find_checkpoint(model_name: str, sites: str, checkpoints_dir: str | Path | None = None,
                    spec: DistillerSpec | None = None) -> Path:
    """Path of the checkpoint for ``model_name`` and ``sites`` under ``checkpoints_dir``.

    Layout: ``<checkpoints_dir>/<model_name>/<sites>-r<rank>.distiller.safetensors``. With ``spec``
    the architecture must match the file name; without it, the single checkpoint for the site pair
    is taken (several raise an error that lists them).
    """
    if checkpoints_dir is None:  # the user's folders first, then the shipped checkpoints
        *others, checkpoints_dir = resources.checkpoint_dirs()
        for root in others:
            try:
                return find_checkpoint(model_name, sites, root, spec)
            except CheckpointNotFoundError:
                pass
    root = Path(checkpoints_dir)
    folder = root / model_name
    hint = PRETRAIN_HINT.format(model=model_name, sites=sites, rank=spec.rank if spec else 64)
    if spec is not None:
        path = folder / checkpoint_filename(sites, spec)
        if path.is_file():
            return path
        candidates = []
    else:
        candidates = sorted(folder.glob(f"{sites}-r*{SUFFIX}"))
        if len(candidates) == 1:
            return candidates[0]
    others = sorted(p.name for p in folder.glob(f"*{SUFFIX}")) if folder.is_dir() else []
    if len(candidates) > 1:
        raise CheckpointError(f"several Distiller checkpoints for model {model_name!r} and sites {sites!r} in "
                              f"{folder}: {[p.name for p in candidates]}; choose one with esamp.warm_start_path=")
    wanted = checkpoint_filename(sites, spec) if spec else f"{sites}-r<rank>{SUFFIX}"
    found = f"; found only {others}" if others else ""
    raise CheckpointNotFoundError(
        f"no pre-trained Distiller for model {model_name!r} with sites {sites!r} (looked for {folder / wanted}"
        f"{found}). Fix: pre-train one with `{hint}` and pass the file it writes as esamp.warm_start_path=<file>, or set "
        "esamp.warm_start=false")
