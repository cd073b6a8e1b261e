"""Dequantised GGUF weights, kept on disk as safetensors so later starts skip the parse.

Reading a GGUF means parsing it and dequantising every tensor (2.7-3.0 s for the default
SmolLM2-135M Q4_1 on a 2-core CPU, most of the 10-12 s `model load` on an H200 host's
slow cores), and every worker of a mesh, every restart, did it again. The first load writes the result to
`cache_dir()/weights/<hash of the GGUF's resolved path>.safetensors`: the same float32
HF-named tensors, with the ModelConfig, the tensor order and a key (loader version,
path, size, mtime) in the safetensors metadata. A later load of the same unchanged file
maps that instead (5 ms; pages come in as the engine copies the weights, copy-on-write),
and the tensors are bit-identical to a fresh parse.

One file per model path (float32: 4 bytes per parameter, 538 MB for the default model);
a changed GGUF (size or mtime) or a loader change (FORMAT_VERSION) rewrites it. The file
is written aside and renamed, so workers starting together never read half of one; a
cache that cannot be written (read-only, disk full) or read (corrupt, truncated) costs
one log line and a fresh parse, never a failed start. PDMESH_WEIGHTS_CACHE=0 turns it
off; delete `cache_dir()/weights` to clear it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pdmesh.config import ModelConfig, RopeScaling

if TYPE_CHECKING:  # `cached_config` (the gateway's) needs no torch
    import torch

log = logging.getLogger(__name__)

_KEY, _CONFIG, _NAMES, _SOURCE = "pdmesh_key", "pdmesh_config", "pdmesh_names", "pdmesh_source"
# Bump when gguf_loader.read_gguf's output (config or weights) changes for the same file:
# it is part of every entry's key, so old entries are redone. Here, not in gguf_loader,
# so that reading a key (cached_config, the gateway's) imports no torch.
FORMAT_VERSION = 1
_STALE_TMP_S = 3600.0  # a temp file this old was left by a writer that died

Reader = Callable[[Path], "tuple[ModelConfig, dict[str, torch.Tensor]]"]


def cache_path(path: Path) -> Path:
    """The cache file of a GGUF: one per resolved path."""
    from pdmesh.config import cache_dir

    name = hashlib.sha1(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir()) / "weights" / f"{name}.safetensors"


def cache_key(path: Path) -> str:
    """What a cache file must match to be used: the loader's format version, the gguf
    package version, ModelConfig's fields and the GGUF's resolved path, size and mtime."""
    import gguf

    resolved = Path(path).resolve()
    st = resolved.stat()
    fields = ",".join(f.name for f in dataclasses.fields(ModelConfig))
    version = getattr(gguf, "__version__", "")
    return f"v{FORMAT_VERSION}|gguf {version}|{fields}|{resolved}|{st.st_size}|{st.st_mtime_ns}"


def load_gguf_cached(path: Path, read: Reader) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """`read(path)` (a GGUF parse), or what an earlier parse of the same file left in the cache."""
    from pdmesh.config import weights_cache_enabled

    if not weights_cache_enabled():
        return read(path)
    key, file = cache_key(path), cache_path(path)
    if (hit := _read(file, key)) is not None:
        return hit
    config, weights = read(path)
    _write(file, key, config, weights, path)
    return config, weights


def cached_config(path: Path) -> ModelConfig | None:
    """The ModelConfig an earlier load of this GGUF left in the cache, from the file's
    header alone (no tensor read, no torch, no GGUF parse: that parse took 2.9 s on the
    dev CPU); None when there is none or it is stale or unreadable."""
    from pdmesh.config import weights_cache_enabled

    file = cache_path(path)
    if not weights_cache_enabled() or not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="numpy") as f:  # the header only; no torch
            meta = f.metadata() or {}
        if meta.get(_KEY) != cache_key(path):
            return None
        return _config_from_json(meta[_CONFIG])
    except Exception as e:  # truncated, garbled: the caller parses the GGUF
        log.warning("weights cache %s header unreadable (%s: %s)", file, type(e).__name__, e)
        return None


def _read(file: Path, key: str) -> tuple[ModelConfig, dict[str, torch.Tensor]] | None:
    if not file.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get(_KEY) != key:
                return None  # another version of the file: parse it and overwrite
            names = json.loads(meta[_NAMES])
            if sorted(names) != sorted(f.keys()):
                raise ValueError("tensor names do not match the metadata")
            config = _config_from_json(meta[_CONFIG])
            weights = {name: f.get_tensor(name) for name in names}
    except Exception as e:  # SafetensorError on a truncated or garbled file, bad JSON, ...
        log.warning("weights cache %s unreadable (%s: %s); parsing the GGUF again",
                    file, type(e).__name__, e)
        return None
    return config, weights


def _write(file: Path, key: str, config: ModelConfig, weights: dict[str, torch.Tensor],
           source: Path) -> None:
    from safetensors.torch import save_file

    tmp = None
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
        os.close(fd)
        metadata = {_KEY: key, _CONFIG: json.dumps(dataclasses.asdict(config)),
                    _NAMES: json.dumps(list(weights)), _SOURCE: str(Path(source).resolve())}
        save_file(weights, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # a 0600 file would hide it from other users of a shared cache
        os.replace(tmp, file)  # atomic: readers see the old file or the whole new one
        tmp = None
    except Exception as e:  # read-only dir, disk full, ...: serve anyway, uncached
        log.warning("weights cache %s not written (%s: %s); later starts parse the GGUF again",
                    file, type(e).__name__, e)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    _prune(file.parent, keep=file)


def _prune(folder: Path, keep: Path) -> None:
    """Drop cache files whose GGUF is gone (e.g. tests' temporary models) and temp files
    left by writers that died, so the folder holds one file per model that exists."""
    from safetensors import safe_open

    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if entry.name.endswith(".tmp"):
                if time.time() - entry.stat().st_mtime > _STALE_TMP_S:
                    entry.unlink()
            elif entry.suffix == ".safetensors" and entry != keep:
                try:
                    with safe_open(str(entry), framework="pt") as f:
                        source = (f.metadata() or {}).get(_SOURCE)
                except Exception:
                    source = None  # unreadable: the next load of its model rewrites it
                if source and not Path(source).exists():
                    entry.unlink()
        except OSError:
            pass


def _config_from_json(text: str) -> ModelConfig:
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
    rope = d.pop("rope_scaling", None)
    return ModelConfig(**d, rope_scaling=RopeScaling(**rope) if rope else None)


__all__ = ["cache_key", "cache_path", "cached_config", "load_gguf_cached"]
