"""Runs one scheduled batch through the model over the paged KV pool.

KV pool: one tensor kv[P, L, page_size, 2, Hkv, Dh]. Page-major on purpose: all of a
page's layers and K/V are contiguous, so moving a request's KV to another worker is one
descriptor per run of consecutive pages, not one per layer; and attention gathers whole
pages per layer (see attention.py).
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from pdmesh.config import EngineConfig, ModelConfig, check_numerics
from pdmesh.runtime.attention import (AttnMetadata, SeqSpan, get_attention_backend,
                                      resolve_attention_backend)
from pdmesh.runtime.triton_backend import to_device
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.scheduler import Batch

# (shape, dtype) -> a zeroed contiguous host tensor: where a worker's KV pool lives
KVAlloc = Callable[[tuple, torch.dtype], torch.Tensor]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU whose flags (in `cpuinfo`) include AVX512-BF16 or AMX-BF16: bf16
    dot-product instructions, on which oneDNN's bf16 GEMMs run ~4x faster than fp32 ones
    (torch.backends.cpu.get_cpu_capability() says only "AVX512" either way). False where
    the file is missing (not Linux) or lists neither."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(_BF16_CPU_FLAGS & set(line.partition(":")[2].split()))
    except OSError:
        pass
    return False


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """EngineConfig.dtype -> torch dtype. "auto": bfloat16 on CUDA and on CPUs with native
    bf16 (cpu_has_native_bf16, and torch's oneDNN runs bf16 there), float32 on other CPUs."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        from pdmesh.runtime.fused import onednn_linear_supported

        bf16 = cpu_has_native_bf16() and onednn_linear_supported(torch.bfloat16)
        return torch.bfloat16 if bf16 else torch.float32
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
    """Owns the model and the KV pool; turns a Batch into logits for its sampled rows.

    On CUDA with the triton backend the forward runs fused kernels (fused.py); with
    `cuda_graphs`, decode batches replay CUDA graphs (cuda_graph.py) and other batches of
    up to max(prefill_graph_tokens) tokens prefill graphs (prefill_graph.py) when they fit.
    On CPU the forward is fused.CpuForward (oneDNN linears on packed weights): `cpu_forward`.
    `numerics="reference"` runs transformers' op order instead (CausalLM.set_reference_numerics):
    torch attention, eager, no fused forward or graphs; greedy tokens then equal
    transformers' at batch 1 (whole-prompt prefill, then one token per step) in bf16 too."""

    def __init__(self, model: CausalLM, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: str, *, attention_backend: str = "auto",
                 cuda_graphs: bool = False, graph_batch_sizes: Sequence[int] = (),
                 graph_max_context: int | None = None, max_batch: int = 64,
                 tune_linears: bool = True, numerics: str = "fast",
                 kv_alloc: KVAlloc | None = None, prefill_graph_tokens: Sequence[int] = (),
                 prefill_budget: int = 4096) -> None:
        c = model.cfg
        self.model, self.page_size, self.device = model, page_size, torch.device(device)
        # kv: [P, L, page, 2, Hkv, Dh]
        shape = (num_pages, c.num_layers, page_size, 2, c.num_kv_heads, c.head_dim)
        if kv_alloc is not None and self.device.type == "cpu":
            self.kv = kv_alloc(shape, dtype)  # zeroed, e.g. in shared memory
        else:
            self.kv = torch.zeros(shape, dtype=dtype, device=self.device)
        self.reference = check_numerics(numerics, attention_backend)
        if self.reference:
            attention_backend = "torch"
        self.backend = resolve_attention_backend(attention_backend, self.device)
        self.attn_cls = get_attention_backend(self.backend)
        self.fused = self.graphs = None  # GPU: FusedForward, DecodeGraphs
        self.cpu_forward = None  # CPU, numerics="fast": CpuForward
        self.linear_speedups: dict[str, float] = {}
        if model.reference != self.reference:
            model.set_reference_numerics(self.reference)
        if self.backend != "torch":
            model.set_attention_backend(self.attn_cls)
        if self.backend not in ("torch", "cpu"):
            from pdmesh.runtime.fused import FusedForward

            self.fused = FusedForward(model, self.device)
        elif self.device.type == "cpu" and not self.reference:
            from pdmesh.runtime.fused import CpuForward

            self.cpu_forward = CpuForward(model)
        self._fast = self.fused if self.fused is not None else self.cpu_forward
        if cuda_graphs and self.fused is not None and self.device.type == "cuda":
            from pdmesh.runtime.cuda_graph import DecodeGraphs, graph_batch_sizes as pick_sizes

            sizes = pick_sizes(graph_batch_sizes or (1,), max_batch)
            if tune_linears:
                self.linear_speedups = self.fused.tune_decode_linears()
            max_ctx = min(graph_max_context or c.max_position_embeddings, num_pages * page_size)
            self.graphs = DecodeGraphs(self._forward_logits, sizes, max_ctx, page_size,
                                       c.vocab_size, self.device)
        self.warmup_s = 0.0  # prefill shapes compiled at start (GPU): pdmesh/runtime/warmup.py
        if self.fused is not None and self.device.type == "cuda":
            from pdmesh.runtime.warmup import warm_prefill

            self.warmup_s = warm_prefill(self)
        self.prefill_graphs = None
        if cuda_graphs and prefill_graph_tokens and self.fused is not None \
                and self.device.type == "cuda":
            from pdmesh.runtime.prefill_graph import PrefillGraphs, prefill_buckets

            buckets = prefill_buckets(prefill_graph_tokens, prefill_budget, max_batch)
            max_ctx = min(graph_max_context or c.max_position_embeddings, num_pages * page_size)
            self.prefill_graphs = PrefillGraphs(self._prefill_logits, buckets, max_ctx,
                                                page_size, self.device)

    def _forward_logits(self, ids: torch.Tensor, pos: torch.Tensor, meta) -> torch.Tensor:
        return self.fused.logits(self.fused(ids, pos, self.kv, meta))

    def _prefill_logits(self, ids: torch.Tensor, pos: torch.Tensor, meta,
                        last: torch.Tensor) -> torch.Tensor:
        return self.fused.logits(self.fused(ids, pos, self.kv, meta)[last])

    def run(self, batch: Batch) -> torch.Tensor:
        """Forward `batch`, writing its KV; returns float32 logits [n_sampled, V]."""
        if self._fast is not None:
            return self._run_fused(batch)
        ids, pos, spans, last = self._flatten(batch)
        meta = AttnMetadata.build(spans, self.page_size, self.device)
        hidden = self.model(torch.tensor(ids, device=self.device), pos.to(self.device),
                            self.kv, meta)  # [T, D]
        if not last:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        if self.reference:
            return self._span_logits(hidden, batch, spans)
        return self.model.logits(hidden[torch.tensor(last, device=self.device)])

    def _span_logits(self, hidden: torch.Tensor, batch: Batch,
                     spans: list[SeqSpan]) -> torch.Tensor:
        """Reference numerics: the LM head over all of a sampled sequence's rows in this
        forward, as transformers' forward computes it (logits_to_keep=0: an [S, V] GEMM
        at prefill; its last row then rounds as there), keeping the last row."""
        rows = [self.model.logits(hidden[sp.q_start: sp.q_start + sp.q_len])[-1]
                for sp, s in zip(spans, batch.seqs) if s.sample]
        return torch.stack(rows)  # [n_sampled, V]

    def _run_fused(self, batch: Batch) -> torch.Tensor:
        """The fast path (CpuForward, or FusedForward on the GPU: no host sync there, inputs
        go through pinned memory, async)."""
        seqs = batch.seqs
        if self.graphs is not None and seqs and all(s.length == 1 and s.sample for s in seqs) \
                and self.graphs.fits(len(seqs), max(s.start + 1 for s in seqs)):
            return self.graphs.run([s.req.token_at(s.start) for s in seqs],
                                   [s.req.pages for s in seqs], [s.start + 1 for s in seqs])
        flat = self._flatten(batch)
        if self.prefill_graphs is not None:
            ids, _, spans, _ = flat
            bucket = self.prefill_graphs.pick(len(ids), len(spans), max(s.ctx_len for s in spans))
            if bucket is not None:
                return self.prefill_graphs.run(bucket, *flat)
        return self.forward_flat(*flat)

    def forward_flat(self, ids: list[int], pos: torch.Tensor, spans: list[SeqSpan],
                     last: list[int]) -> torch.Tensor:
        """The fast path's forward of a flat batch (`_flatten`'s form): writes its KV into
        `spans`' pages; float32 logits of the rows `last` [len(last), V]."""
        meta = self.attn_cls.build_metadata(spans, self.page_size, self.device)
        hidden = self._fast(to_device(torch.tensor(ids), self.device),
                            to_device(pos, self.device), self.kv, meta)  # [T, D]
        if not last:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32)
        if len(last) < hidden.shape[0]:
            hidden = hidden[to_device(torch.tensor(last), self.device)]
        return self._fast.logits(hidden)

    def _flatten(self, batch: Batch) -> tuple[list[int], torch.Tensor, list[SeqSpan], list[int]]:
        """The batch as one flat sequence: token ids [T], positions [T], one SeqSpan per
        sequence, and the flat indices of the rows to sample."""
        ids, pos, spans, last = [], [], [], []
        q_start = 0
        for s in batch.seqs:
            r, end = s.req, s.start + s.length
            ids.extend(r.tokens(s.start, end))
            pos.extend(range(s.start, end))
            spans.append(self._span(r.pages, q_start, s.length, end))
            q_start += s.length
            if s.sample:
                last.append(q_start - 1)
        return ids, torch.tensor(pos, dtype=torch.long), spans, last

    def _span(self, pages: list[int], q_start: int, q_len: int, ctx_len: int) -> SeqSpan:
        n = -(-ctx_len // self.page_size)
        return SeqSpan(q_start, q_len, ctx_len, torch.tensor(pages[:n], dtype=torch.long))
