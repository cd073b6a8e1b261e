"""KV pool layouts and the compatibility check a prefill runs before writing into a decode
worker's pool (pure functions; torch is only touched by the from_* helpers).

Pool shape (pdmesh.runtime.model_runner): kv[num_pages, num_layers, page_size, 2,
num_kv_heads, head_dim], page-major, so page p is the bytes_per_page contiguous bytes at
base + p * bytes_per_page, and copying a page byte for byte is only meaningful when both
sides agree on every field below except num_pages.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

# The fields a byte-for-byte page copy depends on, with the words an error uses for them.
_CHECKED = (("model", "model"), ("dtype", "dtype"), ("page_size", "page size"),
            ("num_layers", "layer count"), ("num_kv_heads", "head geometry: KV heads"),
            ("head_dim", "head geometry: head dim"), ("bytes_per_page", "bytes per page"))


@dataclass(frozen=True)
class KVRank:
    """One tensor-parallel rank's share of a worker's pool (proto KvRank): KV heads
    [head_start, head_end) of every page, in its own pool at kv_base (page p at
    kv_base + p * bytes_per_page), registered with the worker's transfer session."""

    rank: int
    head_start: int
    head_end: int
    kv_base: int
    bytes_per_page: int


@dataclass(frozen=True)
class KVLayout:
    """How a worker's KV pool lays out pages; published in the registry next to its session."""

    model: str
    dtype: str  # torch dtype name without "torch.", e.g. "float32", "bfloat16"
    page_size: int  # tokens per page
    num_layers: int
    num_kv_heads: int
    head_dim: int
    bytes_per_page: int
    num_pages: int
    # a worker split over TP ranks: each rank's heads and pool (the fields above
    # describe the whole logical pool); () = one pool (TP 1)
    ranks: tuple[KVRank, ...] = ()

    def __post_init__(self) -> None:
        for f in ("page_size", "num_layers", "num_kv_heads", "head_dim", "bytes_per_page",
                  "num_pages"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"KVLayout.{f} must be an int >= 1, got {v!r}")

    @classmethod
    def from_tensor(cls, kv: Any, model: str) -> "KVLayout":
        """Layout of a pool tensor kv[P, L, page, 2, Hkv, Dh] holding `model`'s KV."""
        if kv.dim() != 6 or kv.shape[3] != 2:
            raise ValueError(f"KV pool must be [pages, layers, page_size, 2, kv_heads, head_dim], "
                             f"got shape {tuple(kv.shape)}")
        if not kv.is_contiguous():
            raise ValueError("KV pool tensor must be contiguous")
        p, layers, page, _, heads, dim = (int(x) for x in kv.shape)
        return cls(model=model, dtype=str(kv.dtype).removeprefix("torch."), page_size=page,
                   num_layers=layers, num_kv_heads=heads, head_dim=dim,
                   bytes_per_page=kv[0].numel() * kv.element_size(), num_pages=p)

    @classmethod
    def from_engine(cls, engine: Any, model: str | None = None) -> "KVLayout":
        """Layout of a pdmesh.Engine's pool. `model` defaults to engine.config.model; pass a
        stable model id when workers load the same weights from different paths."""
        layout = cls.from_tensor(engine.runner.kv, model or str(engine.config.model))
        mc = engine.model_config
        # The pool is built from these; a disagreement means the engine is inconsistent.
        assert (layout.num_layers, layout.num_kv_heads, layout.head_dim,
                layout.page_size) == (mc.num_layers, mc.num_kv_heads, mc.head_dim,
                                      engine.config.page_size), "KV pool does not match model config"
        return layout

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, e.g. for a registry message or JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "KVLayout":
        """Inverse of to_dict; unknown keys are ignored, missing ones raise ValueError."""
        names = [f.name for f in dataclasses.fields(cls) if f.name != "ranks"]
        missing = [n for n in names if n not in d]
        if missing:
            raise ValueError(f"KV layout is missing {', '.join(missing)}")
        ranks = tuple(KVRank(**r) for r in d.get("ranks", ()))
        return cls(**{n: d[n] for n in names}, ranks=ranks)


def check_compatible(src: KVLayout, dst: KVLayout, dst_pages: Sequence[int] | None = None) -> None:
    """Refuse a transfer src -> dst that would write garbage.

    Raises ValueError naming every mismatching field with both values (model, dtype, page
    size, layer count, head geometry, bytes per page), or naming dst page ids outside
    dst's pool when `dst_pages` is given. num_pages may differ.
    """
    wrong = [f"{label}: source {getattr(src, f)!r} != destination {getattr(dst, f)!r}"
             for f, label in _CHECKED if getattr(src, f) != getattr(dst, f)]
    if wrong:
        raise ValueError("incompatible KV layouts; " + "; ".join(wrong))
    check_ranks(dst)
    if dst_pages is not None:
        check_pages(dst, dst_pages, side="destination")


def check_pages(layout: KVLayout, pages: Sequence[int], side: str = "destination") -> None:
    """Raise ValueError naming the page ids of `pages` outside [0, layout.num_pages)."""
    bad = [p for p in pages if not isinstance(p, int) or not 0 <= p < layout.num_pages]
    if bad:
        raise ValueError(f"{side} page ids out of range [0, {layout.num_pages}): {bad[:8]}"
                         + (f" (+{len(bad) - 8} more)" if len(bad) > 8 else ""))


def check_ranks(layout: KVLayout) -> None:
    """Raise ValueError unless `layout.ranks` (if any) hold every KV head, each rank's
    page bytes being its heads' share of the logical page."""
    if not layout.ranks:
        return
    held: set[int] = set()
    for r in layout.ranks:
        heads = r.head_end - r.head_start
        if not 0 <= r.head_start < r.head_end <= layout.num_kv_heads:
            raise ValueError(f"TP rank {r.rank} holds KV heads [{r.head_start}, "
                             f"{r.head_end}), outside the {layout.num_kv_heads} heads")
        if r.bytes_per_page * layout.num_kv_heads != layout.bytes_per_page * heads:
            raise ValueError(f"TP rank {r.rank}: {r.bytes_per_page} bytes per page for "
                             f"{heads} of {layout.num_kv_heads} KV heads of a "
                             f"{layout.bytes_per_page}-byte page")
        held.update(range(r.head_start, r.head_end))
    if len(held) != layout.num_kv_heads:
        raise ValueError(f"TP ranks hold KV heads {sorted(held)}, not all "
                         f"{layout.num_kv_heads}")
