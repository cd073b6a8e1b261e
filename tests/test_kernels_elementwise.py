"""Kernels against their torch references and the runtime's own modules: RMSNorm (plain,
fused residual add, per-head), rotary embedding (incl. llama3 scaling), SiLU-and-mul and
the KV store. On CPU they run under TRITON_INTERPRET=1 (tests/conftest.py sets it);
on CUDA they also cover bf16/fp16 and model-sized shapes. Outputs start as NaN so an
element the kernel forgets to write fails the comparison.
"""
from __future__ import annotations

import os
import random

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET"

from pdmesh.config import RopeScaling  # noqa: E402
from pdmesh.kernels import (fused_add_rms_norm, fused_add_rms_norm_ref, kv_store,  # noqa: E402
                            kv_store_ref, rms_norm, rms_norm_ref, rope_cos_sin_cache,
                            rotary_embedding, rotary_embedding_ref, silu_and_mul,
                            silu_and_mul_ref)
from pdmesh.rope import apply_rope, rope_inv_freq  # noqa: E402
from pdmesh.runtime.model import MLP, RMSNorm  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if CUDA else [torch.float32]
# elementwise kernels round like torch, so bf16/fp16 differ by at most ~1 ulp
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float16: (2e-3, 2e-3)}
HIDDEN = [48, 576] + ([4096, 5120] if CUDA else [])  # 576 = SmolLM2-135M; 4096 = Llama-3-8B


@pytest.fixture
def seed():
    s = random.randrange(2 ** 31)
    torch.manual_seed(s)
    return s


def nans(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def close(got, want, dtype, seed, what=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", HIDDEN)
def test_rms_norm(dtype, dim, seed):
    x = torch.randn(7, dim, dtype=dtype, device=DEV) * 3
    norm = RMSNorm(dim, 1e-5).to(DEV, dtype)
    with torch.no_grad():
        norm.weight.normal_()
    out = rms_norm(x, norm.weight, 1e-5, out=nans((7, dim), dtype))
    close(out, rms_norm_ref(x, norm.weight, 1e-5), dtype, seed)
    with torch.no_grad():
        close(out, norm(x), dtype, seed, "vs model.RMSNorm")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", HIDDEN)
@pytest.mark.parametrize("inplace", [False, True])
def test_fused_add_rms_norm(dtype, dim, inplace, seed):
    x = torch.randn(5, dim, dtype=dtype, device=DEV)
    res = torch.randn(5, dim, dtype=dtype, device=DEV)
    w = torch.randn(dim, dtype=dtype, device=DEV)
    want_out, want_res = fused_add_rms_norm_ref(x, res, w, 1e-6)
    # the runtime's sequence: x = x + attn(...); h = norm(x)
    assert torch.equal(want_res, res + x)
    if inplace:
        out, new_res = fused_add_rms_norm(x, res, w, 1e-6, out=x, residual_out=res)
        assert out.data_ptr() == x.data_ptr() and new_res.data_ptr() == res.data_ptr()
    else:
        out, new_res = fused_add_rms_norm(x, res, w, 1e-6, out=nans(x.shape, dtype),
                                          residual_out=nans(x.shape, dtype))
    close(new_res, want_res, dtype, seed, "residual")
    close(out, want_out, dtype, seed, "normed")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_per_head_on_strided_view(dtype, seed):
    """qwen3's q/k norm: [T, H, D] views of the qkv output, normalised over D."""
    t, h, hkv, d = 6, 4, 2, 32
    qkv = torch.randn(t, (h + 2 * hkv) * d, dtype=dtype, device=DEV)
    q = qkv[:, : h * d].view(t, h, d)
    w = torch.randn(d, dtype=dtype, device=DEV)
    out = rms_norm(q, w, 1e-6, out=nans((t, h, d), dtype))
    close(out, rms_norm_ref(q, w, 1e-6), dtype, seed)


def _runtime_cos_sin(positions, head_dim, theta, scaling, dtype):
    """What CausalLM.forward computes per position (copied expressions, [T, 1, D])."""
    inv = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
    freqs = positions[:, None].float() * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, RopeScaling(original_max_position_embeddings=64)])
@pytest.mark.parametrize("mode", ["out", "inplace", "inplace+store"])
@pytest.mark.parametrize("heads,head_dim", [((4, 2), 16), ((6, 2), 32)]
                         + ([((32, 8), 128), ((9, 3), 64)] if CUDA else []))
def test_rotary(dtype, scaling, mode, heads, head_dim, seed):
    (h, hkv), d, t, max_pos, page_size = heads, head_dim, 9, 300, 4
    qkv = torch.randn(t, (h + 2 * hkv) * d, dtype=dtype, device=DEV)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    v_before = v.clone()
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    positions = torch.randint(0, max_pos, (t,), device=DEV)
    cache = rope_cos_sin_cache(d, 10000.0, scaling, max_pos, DEV)
    want_q, want_k = rotary_embedding_ref(q, k, positions, cache)
    cos, sin = _runtime_cos_sin(positions, d, 10000.0, scaling, dtype)
    assert torch.equal(want_q, apply_rope(q, cos, sin)), "reference != runtime rope"
    kv = torch.randn(8, 2, page_size, 2, hkv, d, dtype=dtype, device=DEV)  # [P, L, page, 2, Hkv, D]
    want_kv = kv.clone()
    slots = torch.randperm(8 * page_size, device=DEV)[:t]
    slots[1] = -1  # padding row: not stored
    kv_store_ref(want_k, v, want_kv[:, 1], slots)
    if mode == "out":
        got_q, got_k = rotary_embedding(q, k, positions, cache, q_out=nans(q.shape, dtype),
                                        k_out=nans(k.shape, dtype))
    else:
        store = dict(v=v, kv_layer=kv[:, 1], slot_mapping=slots) if "store" in mode else {}
        got_q, got_k = rotary_embedding(q, k, positions, cache, inplace=True, **store)
        assert got_q.data_ptr() == q.data_ptr()
        assert torch.equal(v, v_before), "v was touched"
        if store:
            close(kv, want_kv, dtype, seed, "pool after fused store")
    close(got_q, want_q, dtype, seed, "q")
    close(got_k, want_k, dtype, seed, "k")


def test_rope_cache_uses_llama3_scaling():
    scaling = RopeScaling(original_max_position_embeddings=64)
    cache = rope_cos_sin_cache(64, 500000.0, scaling, 50)  # [50, 64]
    cos, sin = _runtime_cos_sin(torch.arange(50), 64, 500000.0, scaling, torch.float32)
    assert torch.equal(cache, torch.cat((cos[:, 0, :32], sin[:, 0, :32]), dim=-1))
    plain = rope_cos_sin_cache(64, 500000.0, None, 50)
    assert not torch.equal(plain, cache) and torch.equal(plain[:, :3], cache[:, :3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,block", [(48, 16), (100, 1024)]
                         + ([(14336, 1024), (1536, 512)] if CUDA else []))
def test_silu_and_mul(dtype, inter, block, seed):
    x = torch.randn(5, 2 * inter, dtype=dtype, device=DEV) * 2
    out = silu_and_mul(x, out=nans((5, inter), dtype), block=block)
    want = silu_and_mul_ref(x)
    close(out, want, dtype, seed)
    mlp = MLP.__new__(MLP)  # the runtime's MLP.forward with identity projections
    torch.nn.Module.__init__(mlp)
    mlp.inter, mlp.gate_up_proj, mlp.down_proj = inter, torch.nn.Identity(), torch.nn.Identity()
    mlp.reference = False  # the fast path (fused gate_up)
    assert torch.equal(want, mlp(x)), "reference != model.MLP"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("page_size,hkv,d", [(4, 2, 16), (16, 1, 32)]
                         + ([(16, 8, 128), (32, 2, 64)] if CUDA else []))
def test_kv_store(dtype, page_size, hkv, d, seed):
    """New tokens land at their slots in one layer of the pool; nothing else changes."""
    pages, layers, layer, t, h = 12, 3, 1, 10, 2 * hkv
    kv = torch.randn(pages, layers, page_size, 2, hkv, d, dtype=dtype, device=DEV)
    want = kv.clone()
    qkv = torch.randn(t, (h + 2 * hkv) * d, dtype=dtype, device=DEV)  # k, v strided views
    k = qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    slots = torch.randperm(pages * page_size, device=DEV)[:t]
    slots[3] = -1  # a padding row: skipped
    kv_store(k, v, kv[:, layer], slots)
    kv_store_ref(k, v, want[:, layer], slots)
    assert torch.equal(kv, want), f"seed {seed}"
    s = int(slots[0])
    assert torch.equal(kv[s // page_size, layer, s % page_size, 0], k[0])
