"""The fused small-batch GEMV (kernels/gemv.py) against its torch reference: plain, with
bias, with the RMSNorm prologue, the SiLU-and-mul epilogue over gate|up, the residual
epilogue (also in place), for 1 row (CUDA cores) and 2-4 rows (tensor cores), and every
config the runtime may pick. On CPU under
TRITON_INTERPRET=1 at small shapes; on CUDA also the Llama-3-8B shapes. Outputs start as
NaN so an unwritten element fails.
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET"

from pdmesh.kernels.gemv import CONFIGS, fused_gemv, fused_gemv_ref, row_bucket  # noqa: E402
from test_kernels_elementwise import nans, seed  # noqa: E402,F401  (seed is a fixture)

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16]
# relative to the output's largest magnitude: bf16 results differ from the unfused ops by
# their rounding points (a few ulps of the output where silu(gate) * up multiplies two
# rounded values, plus the unrounded normalised x)
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-2}
# (N, K): odd-sized K exercises the masked tail; CUDA adds SmolLM2 and 8B projections
SHAPES = [(40, 96), (192, 576)] + ([(960, 576), (6144, 4096), (4096, 14336)] if CUDA else [])


def cases(rows):
    """(m, dtype) pairs; 2-4 rows use tl.dot, which Triton's CPU interpreter cannot run in
    bf16 (it multiplies the raw bits), so on CPU those run in fp32 only."""
    return [(m, d) for m in rows for d in DTYPES if CUDA or m == 1 or d == torch.float32]


def close(got, want, dtype, seed, what=""):
    scale = want.float().abs().max().item()
    torch.testing.assert_close(got.float(), want.float(), atol=TOL[dtype] * scale, rtol=0,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def operands(m, n, k, dtype):
    x = torch.randn(m, k, dtype=dtype, device=DEV) * 2
    w = torch.randn(n, k, dtype=dtype, device=DEV) / k ** 0.5
    return x, w


@pytest.mark.parametrize("m,dtype", cases([1, 2, 3, 4]))
@pytest.mark.parametrize("n,k", SHAPES)
def test_plain_and_bias(m, n, k, dtype, seed):
    x, w = operands(m, n, k, dtype)
    close(fused_gemv(x, w, out=nans((m, n), dtype)), fused_gemv_ref(x, w), dtype, seed)
    b = torch.randn(n, dtype=dtype, device=DEV)
    close(fused_gemv(x, w, bias=b, out=nans((m, n), dtype)), fused_gemv_ref(x, w, bias=b),
          dtype, seed, "bias")


@pytest.mark.parametrize("m,dtype", cases([1, 3]))
@pytest.mark.parametrize("n,k", SHAPES)
def test_norm_prologue_and_silu_mul(m, n, k, dtype, seed):
    x, w = operands(m, 2 * n, k, dtype)
    g = (torch.rand(k, device=DEV) + 0.5).to(dtype)
    got = fused_gemv(x, w, norm_weight=g, eps=1e-5, out=nans((m, 2 * n), dtype))
    close(got, fused_gemv_ref(x, w, norm_weight=g, eps=1e-5), dtype, seed, "norm")
    got = fused_gemv(x, w, norm_weight=g, eps=1e-5, silu_mul=True, out=nans((m, n), dtype))
    close(got, fused_gemv_ref(x, w, norm_weight=g, eps=1e-5, silu_mul=True), dtype, seed,
          "norm + silu_mul")
    close(fused_gemv(x, w, silu_mul=True), fused_gemv_ref(x, w, silu_mul=True), dtype, seed,
          "silu_mul")


@pytest.mark.parametrize("m,dtype", cases([1, 4]))
@pytest.mark.parametrize("n,k", SHAPES)
def test_residual_epilogue_in_place(m, n, k, dtype, seed):
    x, w = operands(m, n, k, dtype)
    res = torch.randn(m, n, dtype=dtype, device=DEV) * 4
    want = fused_gemv_ref(x, w, residual=res)
    close(fused_gemv(x, w, residual=res, out=nans((m, n), dtype)), want, dtype, seed)
    got = fused_gemv(x, w, residual=res, out=res)
    assert got.data_ptr() == res.data_ptr()
    close(res, want, dtype, seed, "in place")


@pytest.mark.parametrize("m,dtype", [c for c in cases([1, 4]) if c[1] == torch.bfloat16 or
                                     not CUDA and c[0] > 1])
def test_every_config(m, dtype, seed):
    """Each config the runtime may pick at start-up computes the same function."""
    n, k = SHAPES[-1]
    x, w = operands(m, 2 * n, k, dtype)
    g = (torch.rand(k, device=DEV) + 0.5).to(dtype)
    want = fused_gemv_ref(x, w, norm_weight=g, silu_mul=True)
    for cfg in CONFIGS[row_bucket(m)]:
        got = fused_gemv(x, w, norm_weight=g, silu_mul=True, out=nans((m, n), dtype), config=cfg)
        close(got, want, dtype, seed, f"config {cfg}")


def test_bad_input_is_refused():
    x, w = operands(5, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="1-4 rows"):
        fused_gemv(x, w)
    with pytest.raises(ValueError, match="even row count"):
        fused_gemv(x[:1], w[:7], silu_mul=True)
    with pytest.raises(ValueError, match="norm_weight"):
        fused_gemv(x[:1], w, norm_weight=torch.ones(15, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        fused_gemv(x[:1], w, residual=torch.zeros(2, 8, device=DEV))
    with pytest.raises(ValueError, match="w"):
        fused_gemv(x[:1], w.to(torch.bfloat16))
