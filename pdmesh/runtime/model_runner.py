"""Runs one scheduled batch through the model over the paged KV pool.

KV pool: one tensor kv[P, L, page_size, 2, Hkv, Dh]. Page-major on purpose: all of a
page's layers and K/V are contiguous, so moving a request's KV to another worker is one
descriptor per run of consecutive pages, not one per layer; and attention gathers whole
pages per layer (see attention.py).
"""
from __future__ import annotations

import torch

from pdmesh.config import EngineConfig, ModelConfig
from pdmesh.runtime.attention import AttnMetadata, SeqSpan
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.scheduler import Batch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r} (known: auto, {', '.join(_DTYPES)})")
    return _DTYPES[name]


def page_bytes(mcfg: ModelConfig, page_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV page: every layer's K and V for `page_size` tokens."""
    elem = torch.empty((), dtype=dtype).element_size()
    return mcfg.num_layers * 2 * page_size * mcfg.num_kv_heads * mcfg.head_dim * elem


def num_pages_for(cfg: EngineConfig, mcfg: ModelConfig, dtype: torch.dtype) -> int:
    if cfg.num_pages is not None:
        return cfg.num_pages
    n = cfg.kv_cache_bytes // page_bytes(mcfg, cfg.page_size, dtype)
    if n < 1:
        raise ValueError(f"kv_cache_bytes={cfg.kv_cache_bytes} is smaller than one page "
                         f"({page_bytes(mcfg, cfg.page_size, dtype)} bytes)")
    return n


class ModelRunner:
    """Owns the model and the KV pool; turns a Batch into logits for its sampled rows."""

    def __init__(self, model: CausalLM, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: str) -> None:
        c = model.cfg
        self.model, self.page_size, self.device = model, page_size, torch.device(device)
        # kv: [P, L, page, 2, Hkv, Dh]
        self.kv = torch.zeros(num_pages, c.num_layers, page_size, 2, c.num_kv_heads,
                              c.head_dim, dtype=dtype, device=self.device)

    def run(self, batch: Batch) -> torch.Tensor:
        """Forward `batch`, writing its KV; returns float32 logits [n_sampled, V]."""
        ids, pos, spans, last = [], [], [], []
        q_start = 0
        for s in batch.seqs:
            r, end = s.req, s.start + s.length
            ids.extend(r.token_at(i) for i in range(s.start, end))
            spans.append(self._span(r.pages, q_start, s.length, end))
            q_start += s.length
            if s.sample:
                last.append(q_start - 1)
        pos = torch.cat([torch.arange(s.start, s.start + s.length) for s in batch.seqs])
        meta = AttnMetadata.build(spans, self.page_size, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), pos.to(self.device),
                            self.kv, meta)  # [T, D]
        if not last:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        return self.model.logits(hidden[torch.tensor(last, device=self.device)])

    def _span(self, pages: list[int], q_start: int, q_len: int, ctx_len: int) -> SeqSpan:
        n = -(-ctx_len // self.page_size)
        return SeqSpan(q_start, q_len, ctx_len, torch.tensor(pages[:n], dtype=torch.long))
