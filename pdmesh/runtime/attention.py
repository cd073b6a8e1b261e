"""Paged attention: metadata for one forward, and the torch backend.

KV pool layout (see kv_cache.py): kv[page, layer, 0|1, offset, kv_head, head_dim].
A token's KV lives at (page_table[pos // page_size], pos % page_size).
Backends are found through a small registry and imported lazily, so a CUDA-only
backend never loads on CPU.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SeqSpan:
    """One sequence's slice of a forward: q tokens [q_start, q_start+q_len) of the flat batch.

    The sequence has `ctx_len` tokens of KV after this forward (cached prefix + new ones);
    `pages`/`offsets` ([ctx_len] each) locate every one of them in the pool.
    """

    q_start: int
    q_len: int
    ctx_len: int
    pages: torch.Tensor  # [ctx_len] int64
    offsets: torch.Tensor  # [ctx_len] int64


@dataclass
class AttnMetadata:
    """Everything attention needs for one forward over a flat batch of T tokens."""

    store_pages: torch.Tensor  # [T] page of each new token
    store_offsets: torch.Tensor  # [T] offset in that page
    seqs: list[SeqSpan]
    # Decode fast path (every q_len == 1): padded gather indices and validity mask.
    decode_pages: torch.Tensor | None = None  # [B, Lmax]
    decode_offsets: torch.Tensor | None = None  # [B, Lmax]
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, Lmax] bool, True = attend

    @classmethod
    def build(cls, seqs: list[SeqSpan], device: torch.device | str = "cpu") -> "AttnMetadata":
        store_p = torch.cat([s.pages[s.ctx_len - s.q_len:] for s in seqs])
        store_o = torch.cat([s.offsets[s.ctx_len - s.q_len:] for s in seqs])
        meta = cls(store_p.to(device), store_o.to(device), seqs)
        if all(s.q_len == 1 for s in seqs) and len(seqs) > 1:
            lmax = max(s.ctx_len for s in seqs)
            pages = torch.zeros(len(seqs), lmax, dtype=torch.long)
            offs = torch.zeros(len(seqs), lmax, dtype=torch.long)
            lens = torch.tensor([s.ctx_len for s in seqs])
            for i, s in enumerate(seqs):
                pages[i, : s.ctx_len] = s.pages
                offs[i, : s.ctx_len] = s.offsets
            mask = torch.arange(lmax)[None, :] < lens[:, None]
            meta.decode_pages, meta.decode_offsets = pages.to(device), offs.to(device)
            meta.decode_mask = mask[:, None, None, :].to(device)
        return meta


class TorchAttention:
    """Reference paged attention in plain torch (the CPU path; the oracle for kernels)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5

    def store(self, kv_layer: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              meta: AttnMetadata) -> None:
        """Write new K/V ([T, Hkv, D]) into the pool. kv_layer: [P, 2, page, Hkv, D]."""
        kv_layer[meta.store_pages, 0, meta.store_offsets] = k
        kv_layer[meta.store_pages, 1, meta.store_offsets] = v

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        """q: [T, H, D] -> out [T, H, D], attending over each sequence's paged KV."""
        if meta.decode_pages is not None:
            return self._decode(q, kv_layer, meta)
        outs = [self._one(q[s.q_start: s.q_start + s.q_len], kv_layer, s) for s in meta.seqs]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _one(self, q: torch.Tensor, kv_layer: torch.Tensor, s: SeqSpan) -> torch.Tensor:
        k = kv_layer[s.pages, 0, s.offsets]  # [ctx, Hkv, D]
        v = kv_layer[s.pages, 1, s.offsets]
        qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H, n, D]
        prefix = s.ctx_len - s.q_len
        if prefix == 0 or s.q_len == 1:  # plain causal, or one query that sees everything
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=prefix == 0 and s.q_len > 1,
                                                 scale=self.scale, enable_gqa=True)
        else:
            # query t (absolute position prefix + t) sees keys 0 .. prefix + t
            mask = torch.ones(s.q_len, s.ctx_len, dtype=torch.bool).tril(prefix)
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask.to(q.device),
                                                 scale=self.scale, enable_gqa=True)
        return out.transpose(0, 1)

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        k = kv_layer[meta.decode_pages, 0, meta.decode_offsets]  # [B, L, Hkv, D]
        v = kv_layer[meta.decode_pages, 1, meta.decode_offsets]
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
        return out[:, :, 0, :]


_BACKENDS = {"torch": "pdmesh.runtime.attention:TorchAttention"}


def register_attention_backend(name: str, target: str) -> None:
    """Register `module:Class` as an attention backend under `name` (imported on first use)."""
    _BACKENDS[name] = target


def get_attention_backend(name: str):
    """Return the backend class registered under `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (known: {', '.join(_BACKENDS)})")
    module, _, attr = _BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), attr)
