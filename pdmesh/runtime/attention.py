"""Paged attention: metadata for one forward, and the torch backend.

KV pool layout (model_runner.py): kv[page, layer, offset, k|v, kv_head, head_dim].
A token at position `pos` lives at (page_table[pos // page_size], pos % page_size).
Reads gather whole pages (contiguous blocks), not single tokens: on CPU that is several
times cheaper than a per-token gather, and an `index_select` over the layer's [P, page*...]
rows is ~6x cheaper again than advanced indexing of the strided 5-D view. Backends are
found through a small registry and imported lazily, so a CUDA-only backend never loads on
CPU.
"""
from __future__ import annotations

import functools
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
        # plain Python over the (few) new tokens: a handful of small tensors, not 2 per seq
        pages: list[int] = []
        offsets: list[int] = []
        for s in seqs:
            table = s.table.tolist()
            for p in range(s.ctx_len - s.q_len, s.ctx_len):
                pages.append(table[p // page_size])
                offsets.append(p % page_size)
        # the spans' page tables on the pool's device, once per forward (gather_pages)
        where = torch.device(device)
        dev = [s if s.table.device == where else
               SeqSpan(s.q_start, s.q_len, s.ctx_len, s.table.to(where)) for s in seqs]
        meta = cls(torch.tensor(pages, dtype=torch.long).to(device),
                   torch.tensor(offsets, dtype=torch.long).to(device), dev)
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


def gather_pages(kv_layer: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """kv_layer: [P, page, 2, Hkv, D]; table: [..., n] -> [..., n * page, 2, Hkv, D].

    One `index_select` over the layer's page rows ([P, page*2*Hkv*D], a strided 2-D view:
    each page of a layer is one contiguous block), the same values as kv_layer[table].
    `table` is on kv_layer's device (index_select, unlike indexing, needs it there)."""
    rows = kv_layer.flatten(1).index_select(0, table.reshape(-1))  # [N, page*2*Hkv*D]
    return rows.view(*table.shape[:-1], table.shape[-1] * kv_layer.shape[1], *kv_layer.shape[2:])


def gather_kv(kv_layer: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_layer: [P, page, 2, Hkv, D]; table: [..., n] -> K, V: [..., Hkv, n * page, D]."""
    g = gather_pages(kv_layer, table)  # [..., n * page, 2, Hkv, D], whole pages
    return g.select(-3, 0).transpose(-3, -2), g.select(-3, 1).transpose(-3, -2)


EAGER_MAX_SCORES = 768 * 768  # q_len * ctx_len up to which bf16 CPU prefill runs _eager


@functools.lru_cache(maxsize=8)
def _causal_bias(q_len: int, ctx_len: int, device: torch.device) -> torch.Tensor:
    """float32 [q_len, ctx_len]: 0 where query i (position ctx_len - q_len + i) may see
    key j, -inf after."""
    return torch.full((q_len, ctx_len), float("-inf"), device=device).triu(ctx_len - q_len + 1)


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

    def forward(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata,
                k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
        """q: [T, H, D] -> out [T, H, D], attending over each sequence's paged KV.

        `k`, `v` ([T, Hkv, D], as just stored): a sequence with no cached prefix attends
        over them directly instead of reading its pages back."""
        if meta.decode_table is not None:
            return self._decode(q, kv_layer, meta)
        outs = []
        for s in meta.seqs:
            rows = slice(s.q_start, s.q_start + s.q_len)
            new = None if k is None or s.ctx_len != s.q_len else (k[rows], v[rows])
            outs.append(self._one(q[rows], kv_layer, s, new))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _one(self, q: torch.Tensor, kv_layer: torch.Tensor, s: SeqSpan,
             new: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if self.hf_layout:
            return self._one_hf(q, kv_layer, s)
        if new is not None:  # no prefix: this forward's K/V are the whole context
            k, v = new[0].transpose(0, 1), new[1].transpose(0, 1)  # [Hkv, q_len, D]
        else:
            k, v = gather_kv(kv_layer, s.table)  # [Hkv, n * page, D]
            k, v = k[:, : s.ctx_len], v[:, : s.ctx_len]
        if s.q_len == 1:  # one query sees everything: the group's heads as its queries
            g = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(
                q.view(1, self.num_kv_heads, g, self.head_dim), k[None], v[None],
                scale=self.scale)  # [1, Hkv, g, D]
            return out.view(1, self.num_heads, self.head_dim)
        if (q.dtype == torch.bfloat16 and q.device.type == "cpu"
                and s.q_len * s.ctx_len <= EAGER_MAX_SCORES):
            return self._eager(q, k, v)
        # 4-D inputs: SDPA's CPU flash kernel runs them ~1.5x faster than 3-D ones
        qh, prefix = q.transpose(0, 1)[None], s.ctx_len - s.q_len  # [1, H, q_len, D]
        if prefix == 0:
            out = F.scaled_dot_product_attention(qh, k[None], v[None], is_causal=True,
                                                 scale=self.scale, enable_gqa=True)
        else:  # query t (absolute position prefix + t) sees keys 0 .. prefix + t
            mask = torch.ones(s.q_len, s.ctx_len, dtype=torch.bool).tril(prefix)
            out = F.scaled_dot_product_attention(qh, k[None], v[None], attn_mask=mask.to(q.device),
                                                 scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _eager(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """bf16 prefill on CPU: q [S, H, D], k/v [Hkv, ctx, D] -> [S, H, D], rounded as
        transformers' eager attention (bf16 scores, float32 softmax, bf16 probabilities):
        two batched oneDNN GEMMs over each KV head's g query heads, ~2x faster than SDPA's
        CPU flash kernel in bf16 up to ~768 tokens (with freed memory kept in the heap,
        see fused.keep_freed_memory). Query i sees keys up to ctx - S + i."""
        n, ctx = q.shape[0], k.shape[1]
        hkv, d = self.num_kv_heads, self.head_dim
        g = self.num_heads // hkv
        qg = q.view(n, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * n, d)
        scores = torch.matmul(qg, k.transpose(1, 2)).view(hkv, g, n, ctx).float()
        scores.mul_(self.scale).add_(_causal_bias(n, ctx, q.device))
        p = torch.softmax(scores, -1).to(q.dtype).view(hkv, g * n, ctx)
        out = torch.matmul(p, v)  # [Hkv, g * S, D]
        return out.view(hkv, g, n, d).permute(2, 0, 1, 3).reshape(n, self.num_heads, d)

    def _one_hf(self, q: torch.Tensor, kv_layer: torch.Tensor, s: SeqSpan) -> torch.Tensor:
        """Reference numerics: SDPA as transformers calls it ([1, H, q_len, D] with K/V
        contiguous [1, Hkv, ctx_len, D])."""
        k, v = gather_kv(kv_layer, s.table)  # [Hkv, n * page, D]
        k, v = k[:, : s.ctx_len], v[:, : s.ctx_len]
        qh = q.transpose(0, 1)[None]  # [1, H, q_len, D]
        k, v = k[None].contiguous(), v[None].contiguous()
        prefix = s.ctx_len - s.q_len
        if prefix == 0 or s.q_len == 1:  # plain causal, or one query that sees everything
            out = F.scaled_dot_product_attention(qh, k, v, is_causal=prefix == 0 and s.q_len > 1,
                                                 scale=self.scale, enable_gqa=True)
        else:
            # query t (absolute position prefix + t) sees keys 0 .. prefix + t
            mask = torch.ones(s.q_len, s.ctx_len, dtype=torch.bool).tril(prefix)
            out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask.to(q.device),
                                                 scale=self.scale, enable_gqa=True)
        return out[0].transpose(0, 1)

    def _decode(self, q: torch.Tensor, kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        k, v = gather_kv(kv_layer, meta.decode_table)  # [B, Hkv, L, D]
        if self.hf_layout:
            out = F.scaled_dot_product_attention(
                q[:, :, None, :], k, v,
                attn_mask=meta.decode_mask, scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
            return out[:, :, 0, :]
        # the g query heads that share a KV head are that head's g queries: K/V read once
        # per KV head, and no GQA path (in bf16 SDPA's CPU kernel runs q_len=1 with
        # enable_gqa ~8x slower than this)
        b, g = q.shape[0], self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.view(b, self.num_kv_heads, g, self.head_dim), k, v,
            attn_mask=meta.decode_mask, scale=self.scale)  # [B, Hkv, g, D]
        return out.reshape(b, self.num_heads, self.head_dim)  # CUDA's SDPA: not contiguous


_BACKENDS = {"torch": "pdmesh.runtime.attention:TorchAttention",
             "triton": "pdmesh.runtime.triton_backend:TritonAttention",
             "cpu": "pdmesh.runtime.cpu_attention:CpuPagedAttention"}


def register_attention_backend(name: str, target: str) -> None:
    """Register `module:Class` as an attention backend under `name` (imported on first use)."""
    _BACKENDS[name] = target


def resolve_attention_backend(name: str, device: torch.device | str) -> str:
    """"auto" -> "triton" on CUDA when Triton imports, else "torch"; on CPU "cpu" (the C++
    paged decode kernel, cpu_attention.py) when it builds and loads here, else "torch" (as
    for an explicit "cpu", which is for CPU devices only). Others unchanged."""
    kind = torch.device(device).type
    if name == "cpu" and kind != "cpu":
        raise ValueError(f"attention backend 'cpu' runs on CPU only, not {kind}")
    if name == "cpu" or (name == "auto" and kind == "cpu"):  # the kernel, where it loads
        return "cpu" if importlib.import_module("pdmesh.runtime.cpu_attention").available() \
            else "torch"
    if name != "auto":
        get_attention_backend(name)  # unknown names fail here
        return name
    if kind != "cuda":
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
