"""Paged attention: metadata for one forward, and the torch backend.

KV pool layout (model_runner.py): kv[page, layer, offset, k|v, kv_head, head_dim].
A token at position `pos` lives at (page_table[pos // page_size], pos % page_size).
Reads gather whole pages (contiguous blocks), not single tokens: on CPU that is several
times cheaper than a per-token gather. Backends are found through a small registry and
imported lazily, so a CUDA-only backend never loads on CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """One sequence's slice of a forward: q tokens [q_start, q_start+q_len) of the flat batch.

    The sequence has `ctx_len` tokens of KV after this forward (cached prefix + new ones),
    in the pages of `table` ([ceil(ctx_len / page_size)] page ids, in order).
    """

    q_start: int
    q_len: int
    ctx_len: int
    table: torch.Tensor  # [n_pages] int64


@dataclass
class AttnMetadata:
    """Everything attention needs for one forward over a flat batch of T tokens."""

    store_pages: torch.Tensor  # [T] page of each new token
    store_offsets: torch.Tensor  # [T] offset in that page
    seqs: list[SeqSpan]
    # Decode fast path (every q_len == 1, B > 1): padded page tables and validity mask.
    decode_table: torch.Tensor | None = None  # [B, max_pages], padding = page 0 (masked)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_pages * page_size], True = attend

    @classmethod
    def build(cls, seqs: list[SeqSpan], page_size: int,
              device: torch.device | str = "cpu") -> "AttnMetadata":
        pos = torch.cat([torch.arange(s.ctx_len - s.q_len, s.ctx_len) for s in seqs])
        pages = torch.cat([s.table[torch.arange(s.ctx_len - s.q_len, s.ctx_len) // page_size]
                           for s in seqs])
        meta = cls(pages.to(device), (pos % page_size).to(device), seqs)
        if len(seqs) > 1 and all(s.q_len == 1 for s in seqs):
            width = max(len(s.table) for s in seqs)
            table = torch.zeros(len(seqs), width, dtype=torch.long)
            for i, s in enumerate(seqs):
                table[i, : len(s.table)] = s.table
            lens = torch.tensor([s.ctx_len for s in seqs])
            mask = torch.arange(width * page_size)[None, :] < lens[:, None]
            meta.decode_table = table.to(device)
            meta.decode_mask = mask[:, None, None, :].to(device)
        return meta


def gather_kv(kv_layer: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_layer: [P, page, 2, Hkv, D]; table: [..., n] -> K, V: [..., Hkv, n * page, D]."""
    g = kv_layer[table]  # [..., n, page, 2, Hkv, D], whole pages
    g = g.flatten(-5, -4)  # [..., n * page, 2, Hkv, D] (a view: pages are contiguous)
    return g.select(-3, 0).transpose(-3, -2), g.select(-3, 1).transpose(-3, -2)


class TorchAttention:
    """Reference paged attention in plain torch (the CPU path; the oracle for kernels)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 hf_layout: bool = False) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        # reference numerics: SDPA gets 4-D inputs, K/V contiguous, as transformers passes
        # them. On CUDA that picks SDPA's fused (flash) kernel as there; 3-D inputs always
        # take the math kernel (fused kernels need 4-D), which rounds bf16 differently.
        self.hf_layout = hf_layout

    @staticmethod
    def build_metadata(seqs: list[SeqSpan], page_size: int,
                       device: torch.device | str = "cpu") -> AttnMetadata:
        return AttnMetadata.build(seqs, page_size, device)

    def store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              meta: AttnMetadata) -> None:
        """Write new K/V ([T, Hkv, D]) into the pool. kv_layer: [P, page, 2, Hkv, D]."""
        kv_layer[meta.store_pages, meta.store_offsets] = torch.stack((k, v), dim=1)

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """q: [T, H, D] -> out [T, H, D], attending over each sequence's paged KV."""
        if meta.decode_table is not None:
            return self._decode(q, kv_layer, meta)
        outs = [self._one(q[s.q_start: s.q_start + s.q_len], kv_layer, s) for s in meta.seqs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _one(self, q: torch.Tensor, kv_layer: torch.Tensor, s: SeqSpan) -> torch.Tensor:
        k, v = gather_kv(kv_layer, s.table)  # [Hkv, n * page, D]
        k, v = k[:, : s.ctx_len], v[:, : s.ctx_len]
        qh = q.transpose(0, 1)  # [H, q_len, D]
        if self.hf_layout:  # [1, H, q_len, D], [1, Hkv, ctx_len, D]
            qh, k, v = qh[None], k[None].contiguous(), v[None].contiguous()
        prefix = s.ctx_len - s.q_len
        if prefix == 0 or s.q_len == 1:  # plain causal, or one query that sees everything
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=prefix == 0 and s.q_len > 1,
                                                 scale=self.scale, enable_gqa=True)
        else:
            # query t (absolute position prefix + t) sees keys 0 .. prefix + t
            mask = torch.ones(s.q_len, s.ctx_len, dtype=torch.bool).tril(prefix)
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask.to(q.device),
                                                 scale=self.scale, enable_gqa=True)
        return (out[0] if self.hf_layout else out).transpose(0, 1)

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        k, v = gather_kv(kv_layer, meta.decode_table)  # [B, Hkv, L, D]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k, v,
            attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
        return out[:, :, 0, :]


_BACKENDS = {"torch": "pdmesh.runtime.attention:TorchAttention",
             "triton": "pdmesh.runtime.triton_backend:TritonAttention"}


def register_attention_backend(name: str, target: str) -> None:
    """Register `module:Class` as an attention backend under `name` (imported on first use)."""
    _BACKENDS[name] = target


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """"auto" -> "triton" on CUDA when Triton imports, else "torch"; others unchanged."""
    if name != "auto":
        get_attention_backend(name)  # unknown names fail here
        return name
    if torch.device(device).type != "cuda":
        return "torch"
    try:
        importlib.import_module("pdmesh.kernels.paged_decode_attention")
    except ImportError:
        return "torch"
    return "triton"


def get_attention_backend(name: str):
    """Return the backend class registered under `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(_BACKENDS)})")
    module, _, attr = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
