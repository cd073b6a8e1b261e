"""The "cpu" attention backend: decode attention read in place from the paged KV pool.

`paged_decode_attention` runs the C++ kernel of csrc/paged_decode_cpu.cpp (built once per
machine by cpu_ext.py): one query token per sequence, GQA, K/V read straight from the
pool through the page table, no gather, fp32 online softmax, one task per (sequence, kv
head) over torch's intra-op threads. `paged_decode_attention_ref` is the same function
in plain torch (the kernel's test oracle). `CpuPagedAttention` is TorchAttention with
decode steps (every q_len == 1) through the kernel; prefill is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.runtime import cpu_ext
from pdmesh.runtime.attention import AttnMetadata, SeqSpan, TorchAttention, gather_kv


def available() -> bool:
    """True when the kernel is built and loaded (builds it on first call, see cpu_ext)."""
    return cpu_ext.load()


def paged_decode_attention(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor,
                           lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, *,
                           generic: bool = False) -> torch.Tensor:
    """q [B, H, D], kv_layer [P, page, 2, Hkv, D] (a strided view of the pool is fine; last
    dim contiguous), table [B, W] int64 (page ids; entries past a sequence's pages unread),
    lens [B] int64 (tokens of KV per sequence) -> [B, H, D] in q's dtype (fp32 or bf16).
    Writes `out` when given (same shape and dtype as q). `generic`: the kernel's generic
    loop even where a compiled fast path exists (head dim 64/128, <= 8 heads per kv head)."""
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    torch.ops.pdmesh_cpu.paged_decode_attention(q, kv_layer, table, lens, float(scale), out, generic)
    return out


def paged_decode_attention_ref(q: torch.Tensor, kv_layer: torch.Tensor, table: torch.Tensor,
                               lens: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain torch in fp32 (fp64 for fp64 inputs): per sequence, gather its pages,
    softmax(scale q.K) V with the g query heads of a kv head reading it. Same contract
    as paged_decode_attention."""
    b, h, d = q.shape
    g = h // kv_layer.shape[3]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.empty(b, h, d, dtype=acc)
    for i in range(b):
        n = int(lens[i])
        pages = -(-n // kv_layer.shape[1])
        k, v = gather_kv(kv_layer, table[i, :pages])  # [Hkv, pages * page, D]
        k = k[:, :n].to(acc).repeat_interleave(g, 0)  # [H, n, D]
        v = v[:, :n].to(acc).repeat_interleave(g, 0)
        p = torch.softmax(torch.einsum("hd,hnd->hn", q[i].to(acc), k) * scale, -1)
        out[i] = torch.einsum("hn,hnd->hd", p, v)
    return out.to(q.dtype)


@dataclass
class CpuDecodeMeta(AttnMetadata):
    """AttnMetadata plus, on a decode step, the kernel's page table and lengths. The
    inherited fields are AttnMetadata.build's, so TorchAttention reads it unchanged (a
    loaded model shared by engines of both backends swaps its layers' backend)."""

    kernel_table: torch.Tensor | None = None  # [B, W] int64 page ids
    kernel_lens: torch.Tensor | None = None  # [B] int64 tokens of KV per sequence


class CpuPagedAttention(TorchAttention):
    """TorchAttention whose decode steps (every q_len == 1, any batch size) run the C++
    kernel over the pool in place; prefill and mixed steps stay on the torch path."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        if not available():  # resolve_attention_backend picks "torch" instead
            raise RuntimeError("the CPU paged decode attention extension did not build")
        super().__init__(num_heads, num_kv_heads, head_dim)

    @staticmethod
    def build_metadata(seqs: list[SeqSpan], page_size: int,
                       device: torch.device | str = "cpu") -> CpuDecodeMeta:
        meta = CpuDecodeMeta.build(seqs, page_size, device)
        if all(s.q_len == 1 for s in seqs):
            meta.kernel_table = meta.decode_table if meta.decode_table is not None \
                else seqs[0].table[None].to(device)  # one sequence: its own pages
            meta.kernel_lens = torch.tensor([s.ctx_len for s in seqs], device=device)
        return meta

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata,
                k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D] -> [T, H, D] (TorchAttention.forward's contract)."""
        lens = getattr(meta, "kernel_lens", None)
        if lens is None:  # prefill / mixed step, or another backend's metadata
            return super().forward(q, kv_layer, meta, k, v)
        return paged_decode_attention(q, kv_layer, meta.kernel_table, lens, self.scale)
