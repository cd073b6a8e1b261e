"""One parse of a GGUF file per model load (no torch: the gateway imports it).

A cold load reads a GGUF twice: pdmesh's loader parses it for the weights
(`gguf_loader.read_gguf`), then transformers parses it again to build the tokenizer
(`AutoTokenizer.from_pretrained(gguf_file=...)`). Each parse of SmolLM2's file takes
3.6 s of the dev CPU's 10.3 s cold `load_model` (its 49k-token vocabulary, field by field).
Within `one_parse()`, `open_reader` keeps the reader it parses and `lent_to_transformers`
hands that reader to transformers' own parse of the same file instead of a new one.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator

_lock = threading.Lock()
_kept: dict[str, Any] = {}  # resolved path -> GGUFReader, inside one_parse() only
_depth = 0


def _key(path: str | Path) -> str:
    return str(Path(path).resolve())


@contextlib.contextmanager
def one_parse() -> Iterator[None]:
    """Keep the readers `open_reader` parses until the outermost `one_parse` ends."""
    global _depth
    with _lock:
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _kept.clear()


def open_reader(path: str | Path) -> Any:
    """A GGUFReader of `path`: the one kept within `one_parse()`, else a new parse."""
    from gguf import GGUFReader

    key = _key(path)
    with _lock:
        if key in _kept:
            return _kept[key]
    reader = GGUFReader(path)
    with _lock:
        if _depth:
            _kept[key] = reader
    return reader


@contextlib.contextmanager
def lent_to_transformers(path: str | Path) -> Iterator[None]:
    """While inside, `gguf.GGUFReader(path)` returns the reader kept for `path`, if one
    is (transformers imports GGUFReader from `gguf` when it parses a file); any other
    call makes a new reader as usual."""
    import gguf

    key = _key(path)
    with _lock:
        kept = _kept.get(key)
    if kept is None:
        yield
        return
    real = gguf.GGUFReader

    def reader(p: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and _key(p) == key:
            return kept
        return real(p, *args, **kwargs)

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = real
