"""The "triton" attention backend: paged attention and KV store through pdmesh.kernels.

Used on CUDA (selected automatically there; CPU keeps TorchAttention). Its metadata is
all device tensors of fixed meaning, so a decode step can be captured in a CUDA graph
and replayed with new contents in the same buffers (cuda_graph.py):

  slot_mapping [T] int64   page * page_size + offset of each new token; -1 = skip (padding)
  block_table  [B, W] int32 page ids per sequence; entries past a sequence's pages unread
  ctx_lens     [B] int32   tokens of KV per sequence after this forward; 0 = padding row

Prefill (any q_len > 1) also carries the per-sequence spans; it runs 5a's prefill
kernel when pdmesh.kernels has one, else the torch reference per sequence.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import torch

from pdmesh.runtime.attention import SeqSpan, TorchAttention


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device without a host sync (pinned staging, async copy)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class TritonMeta:
    """Attention metadata for one forward (see module docstring for shapes)."""

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    ctx_lens: torch.Tensor
    decode: bool  # every sequence has q_len == 1
    seqs: list[SeqSpan] = field(default_factory=list)  # prefill only
    q_start: torch.Tensor | None = None  # [B + 1] int32 cumulative query starts (prefill)
    max_q_len: int = 0
    num_splits: int | None = None  # decode split-K override (None = the kernel chooses)


def host_decode_arrays(spans: list[SeqSpan], page_size: int,
                       width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ints [3, B] int64 = slot, ctx_len, position; table [B, W] int32) on the host."""
    w = width or max(len(s.table) for s in spans)
    table = torch.zeros(len(spans), w, dtype=torch.int32)
    ints = torch.empty(3, len(spans), dtype=torch.long)
    for i, s in enumerate(spans):
        n = len(s.table)
        table[i, :n] = s.table
        pos = s.ctx_len - 1
        ints[0, i] = int(s.table[pos // page_size]) * page_size + pos % page_size
        ints[1, i] = s.ctx_len
        ints[2, i] = pos
    return ints, table


def build_metadata(spans: list[SeqSpan], page_size: int,
                   device: torch.device | str) -> TritonMeta:
    """Metadata for a flat batch; a handful of async host->device copies, no sync."""
    device = torch.device(device)
    if all(s.q_len == 1 for s in spans):
        ints, table = host_decode_arrays(spans, page_size)
        ints, table = to_device(ints, device), to_device(table, device)
        return TritonMeta(ints[0], table, ints[1].to(torch.int32), True, list(spans))
    slots, lens, starts = [], [], [0]
    width = max(len(s.table) for s in spans)
    table = torch.zeros(len(spans), width, dtype=torch.int32)
    for i, s in enumerate(spans):
        table[i, : len(s.table)] = s.table
        pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len)
        slots.append(s.table[pos // page_size] * page_size + pos % page_size)
        lens.append(s.ctx_len)
        starts.append(starts[-1] + s.q_len)
    slot = to_device(torch.cat(slots), device)
    small = to_device(torch.tensor([lens, starts[:-1]], dtype=torch.int32), device)
    q_start = to_device(torch.tensor(starts, dtype=torch.int32), device)
    table = to_device(table, device)
    # device copies of the spans' page lists, for the torch fallback's gathers
    dev = [SeqSpan(s.q_start, s.q_len, s.ctx_len, table[i, : len(s.table)].long())
           for i, s in enumerate(spans)]
    return TritonMeta(slot, table, small[0], False, dev, q_start, max(s.q_len for s in spans))


def _kernel(name: str):
    """pdmesh.kernels.<name> or None when that kernel does not exist (yet)."""
    try:
        mod = importlib.import_module("pdmesh.kernels")
    except ImportError:
        return None
    fn = getattr(mod, name, None)
    if fn is not None:
        return fn
    for sub in ("paged_decode_attention", "prefill_attention", "kv_store"):
        try:
            fn = getattr(importlib.import_module(f"pdmesh.kernels.{sub}"), name, None)
        except ImportError:
            continue
        if fn is not None:
            return fn
    return None


class TritonAttention:
    """Paged attention over pdmesh.kernels; same call contract as TorchAttention."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self._kv_store = _kernel("kv_store")
        self._decode = _kernel("paged_decode_attention")
        self._prefill = _kernel("prefill_attention") or _kernel("paged_prefill_attention")
        if self._kv_store is None or self._decode is None:
            raise ImportError("pdmesh.kernels lacks kv_store / paged_decode_attention")
        self._torch = TorchAttention(num_heads, num_kv_heads, head_dim)

    build_metadata = staticmethod(build_metadata)

    def store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              meta: TritonMeta) -> None:
        """k, v: [T, Hkv, D] -> pool slots (kv_layer: [P, page, 2, Hkv, D] view)."""
        self._kv_store(k, v, kv_layer, meta.slot_mapping)

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: TritonMeta) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D]."""
        if meta.decode:
            return self._decode(q, kv_layer, meta.block_table, meta.ctx_lens, self.scale,
                                num_splits=meta.num_splits)
        if self._prefill is not None:
            return self._prefill(q, kv_layer, meta.block_table, meta.q_start, meta.ctx_lens,
                                 meta.max_q_len, self.scale)
        outs = [self._torch._one(q[s.q_start: s.q_start + s.q_len], kv_layer, s)
                for s in meta.seqs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
