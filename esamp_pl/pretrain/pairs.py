"""(source, target) hidden-state pairs of the frozen LM over a corpus, cached as safetensors shards.

The LM runs once over the packed corpus (no grad, eval mode) with the same :class:`SiteCapture`
hooks that generation uses, keeping every non-padding position. The pairs and the LM head (for the
top-1 agreement metric) are written under ``<cache_root>/pairs/<model>/<key>/``, where the key
hashes the model fingerprint and dtype, the site pair, the corpus content and the cache dtype.
A later run with the same key reuses the folder; any change gives a new key and a rebuild. A
folder is written under a temporary name and renamed when complete, so a crash never leaves a
cache that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from esamp_pl.files import atomic_dir, cache_root, write_json_atomic
from esamp_pl.pretrain.corpus import PackedCorpus
from esamp_pl.sites import OutputHead, SiteCapture, SitePair

log = logging.getLogger(__name__)
FORMAT = "esamp_pl.pairs/1"
MANIFEST = "manifest.json"
SHARD_ROWS = 65536


def pair_cache_key(*, model_fingerprint: str, model_dtype: str, sites: str, corpus_key: str,
                   cache_dtype: str) -> str:
    blob = json.dumps({"format": FORMAT, "model": model_fingerprint, "dtype": model_dtype, "sites": sites,
                       "corpus": corpus_key, "cache_dtype": cache_dtype}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class PairCache:
    """A complete cache folder: shards of pairs, the LM head, and a manifest describing them."""

    folder: Path
    manifest: dict[str, Any]

    @property
    def hidden_size(self) -> int:
        return int(self.manifest["hidden_size"])

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @classmethod
    def open(cls, folder: str | Path, key: str | None = None) -> "PairCache | None":
        """The cache in ``folder`` if it is complete (and has ``key``, when given), else None."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        if manifest.get("format") != FORMAT or (key is not None and manifest.get("key") != key):
            return None
        files = [shard["file"] for shard in manifest.get("shards", [])] + ["head.safetensors"]
        if not all((folder / name).is_file() for name in files):
            return None
        return cls(folder, manifest)

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(source [rows, d], target [rows, d], window index [rows]) in the cache dtype."""
        parts = [load_file(str(self.folder / shard["file"])) for shard in self.manifest["shards"]]
        return tuple(torch.cat([p[name] for p in parts]) for name in ("source", "target", "window"))

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
        """(weight [vocab, d], bias or None, final logit softcap or None) of the LM's output head."""
        tensors = load_file(str(self.folder / "head.safetensors"))
        return tensors["weight"], tensors.get("bias"), self.manifest.get("softcap")


@torch.no_grad()
def extract_pairs(model, sites: SitePair, corpus: PackedCorpus, *, batch_size: int, device: torch.device | str,
                  dtype: torch.dtype):
    """Yield (source, target, window index) rows batch by batch, at ``corpus.train_mask`` positions."""
    model.eval()
    with SiteCapture(model, sites, last_position_only=False) as capture:
        for start in tqdm(range(0, len(corpus.input_ids), batch_size), desc="hidden states", unit="batch"):
            ids = corpus.input_ids[start:start + batch_size].to(device)
            attention = corpus.mask[start:start + batch_size].to(device).long()
            model(input_ids=ids, attention_mask=attention, use_cache=False, logits_to_keep=1)
            source, target = capture.pop()
            keep = corpus.train_mask[start:start + batch_size].to(device)
            window = torch.arange(start, start + len(ids), device=device)[:, None].expand_as(keep)
            yield source[keep].to(dtype).cpu(), target[keep].to(dtype).cpu(), window[keep].to(torch.int32).cpu()


def build_pair_cache(loaded, sites: SitePair, corpus: PackedCorpus, *, cache_dtype: str, batch_size: int,
                     device: torch.device | str, root: Path | None = None) -> tuple[PairCache, bool]:
    """The pair cache for this model, sites and corpus: reused if present, else built. Returns (cache, reused)."""
    key = pair_cache_key(model_fingerprint=loaded.fingerprint, model_dtype=loaded.spec.dtype, sites=sites.preset,
                         corpus_key=corpus.key, cache_dtype=cache_dtype)
    folder = (root or cache_root() / "pairs") / loaded.spec.name / key[:24]
    cached = PairCache.open(folder, key)
    if cached is not None:
        return cached, True

    dtype = getattr(torch, cache_dtype)
    with atomic_dir(folder, is_complete=lambda found: PairCache.open(found, key) is not None) as tmp:
        started = time.perf_counter()
        shards, buffer, rows = [], [], 0

        def flush() -> None:
            if not buffer:
                return
            tensors = {name: torch.cat([b[i] for b in buffer]).contiguous()
                       for i, name in enumerate(("source", "target", "window"))}
            if not (torch.isfinite(tensors["source"]).all() and torch.isfinite(tensors["target"]).all()):
                raise ValueError(f"hidden states overflow {cache_dtype} (or the model produced non-finite "
                                 "values). Fix: data.cache_dtype=float32")
            name = f"shard-{len(shards):05d}.safetensors"
            save_file(tensors, str(tmp / name))
            shards.append({"file": name, "rows": len(tensors["window"])})
            buffer.clear()

        for part in extract_pairs(loaded.model, sites, corpus, batch_size=batch_size, device=device, dtype=dtype):
            buffer.append(part)
            rows += len(part[2])
            if sum(len(b[2]) for b in buffer) >= SHARD_ROWS:
                flush()
        flush()
        head = OutputHead(loaded.model)
        head_tensors = {"weight": head.weight.detach().to("cpu", dtype).contiguous()}
        if head.bias is not None:
            head_tensors["bias"] = head.bias.detach().to("cpu", dtype).contiguous()
        save_file(head_tensors, str(tmp / "head.safetensors"))
        manifest = {"format": FORMAT, "key": key, "model_name": loaded.spec.name,
                    "model_id": _model_id(loaded.spec), "model_fingerprint": loaded.fingerprint,
                    "model_dtype": loaded.spec.dtype, "sites": sites.preset,
                    "hidden_size": int(loaded.model.config.hidden_size), "rows": rows, "shards": shards,
                    "cache_dtype": cache_dtype, "softcap": head.softcap, "corpus": corpus.meta}
        write_json_atomic(tmp / MANIFEST, manifest)
    seconds = time.perf_counter() - started
    log.info("extracted %d pairs in %.1f s: %.0f pairs/s", rows, seconds, rows / max(seconds, 1e-9))
    return PairCache(folder, manifest), False


def _model_id(spec) -> str:
    return spec.name_or_path + (f" ({spec.gguf_file})" if spec.gguf_file else "")
