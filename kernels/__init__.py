"""Triton kernels with their torch references, importable as `pdmesh.kernels` (through
the symlink pdmesh/kernels -> ../kernels). Each op `x` has `x(...)` (the Triton launch,
allocating its output unless `out=` is given) and `x_ref(...)` (plain torch, equal to
what the runtime's CPU path computes). Importing this needs triton; the CPU runtime never
imports it (the rope math both share is pdmesh.rope, torch only).
Tests: tests/test_kernels*.py (CPU: under TRITON_INTERPRET=1, set by tests/conftest.py).
Timing / config sweep on a GPU: `python -m pdmesh.kernels.bench [--quick]`.
"""
from .activation import silu_and_mul, silu_and_mul_ref
from .kv_store import kv_store, kv_store_ref, slot_mapping_from
from .paged_decode_attention import (choose_num_splits, paged_decode_attention,
                                     paged_decode_attention_ref)
from .prefill_attention import prefill_attention, prefill_attention_ref
from .rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from .rotary import rope_cos_sin_cache, rotary_embedding, rotary_embedding_ref

__all__ = [
    "choose_num_splits", "fused_add_rms_norm", "fused_add_rms_norm_ref", "kv_store",
    "kv_store_ref", "paged_decode_attention", "paged_decode_attention_ref", "prefill_attention",
    "prefill_attention_ref", "rms_norm", "rms_norm_ref", "rope_cos_sin_cache",
    "rotary_embedding", "rotary_embedding_ref", "silu_and_mul", "silu_and_mul_ref",
    "slot_mapping_from",
]
