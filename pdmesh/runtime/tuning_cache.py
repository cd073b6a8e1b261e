"""Start-up kernel tuning, remembered on disk (plain Python + json).

The GPU runtime times kernel configs against cuBLAS for each weight shape when an
engine starts (triton_linear.LinearDispatch, decode_gemv.SmallBatchLinears). The answer
depends only on the device, the software versions and the shape, so it is kept in
`cache_dir()/tuning.json` and a later start (every worker of a mesh, every restart)
skips the timing runs and the compiles of the configs it would have tried.
Delete the file (or set PDMESH_CACHE_DIR elsewhere) to time again.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

_memo: dict[str, Any] | None = None


def _path() -> Path:
    from pdmesh.config import cache_dir

    return Path(cache_dir()) / "tuning.json"


def _load() -> dict[str, Any]:
    global _memo
    if _memo is None:
        try:
            _memo = json.loads(_path().read_text())
        except (OSError, ValueError):
            _memo = {}
    return _memo


def _save(entries: dict[str, Any]) -> None:
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # merge with what other processes wrote meanwhile
            on_disk = json.loads(path.read_text())
        except (OSError, ValueError):
            on_disk = {}
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump({**on_disk, **entries}, f)
        os.replace(tmp, path)
    except OSError:  # a read-only cache is only slower
        pass


def key(*parts: Any) -> str:
    """A cache key from the device, versions and the caller's parts."""
    import torch
    import triton

    return "|".join(map(str, (torch.__version__, triton.__version__, *parts)))


def cached(k: str, compute: Callable[[], Any]) -> Any:
    """`compute()` the first time `k` is seen on this machine, the stored answer after.
    The answer must be JSON (lists come back as lists)."""
    entries = _load()
    if k not in entries:
        entries[k] = compute()
        _save({k: entries[k]})
    return entries[k]
