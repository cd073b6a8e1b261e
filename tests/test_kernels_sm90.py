"""Every kernel compiles for Hopper (sm_90) with its default H100 configuration, on a
machine without a GPU, and the compiled bf16 code has the intended shape: no register
spills, tensor-core MMAs in the attention kernels (and the 2-4-row GEMV), K/V tiles
pipelined through cp.async; every fused-GEMV config the runtime may pick compiles.

The interpreter (the other kernel tests) is lenient about things the GPU compiler
rejects; this catches those in CI. The launch wrappers run for real on CPU tensors with
`JITFunction.run` intercepted: each launch is compiled (triton.compile for sm_90, with
the JIT's own 16-divisibility specialisation of the actual arguments) instead of run.
It runs in a subprocess because conftest turns the interpreter on for this process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          timeout=600)
    if proc.returncode == 3:
        pytest.skip(proc.stdout.strip())  # this triton build has no CUDA backend / ptxas
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    assert len(report) >= 20 and "decode_bf16_d128_g4_s8_decode_reduce_kernel" in report, report
    for name, r in report.items():
        if "fp32" in name:  # exact-fp32 dots (tests, fp32 runtimes) run on FMA units: compile only
            continue
        assert r["stack"] == 0, f"{name} spills registers: {r}"
        if name.startswith("gemv_r4"):  # 2-4 rows: tl.dot, padded to 16 rows
            assert r["mma"] > 0, f"{name} has no tensor-core MMA: {r}"
        if name.startswith(("decode", "prefill")) and "reduce" not in name:
            assert r["mma"] > 0, f"{name} has no tensor-core MMA: {r}"
            assert r["cp_async"] > 0, f"{name} does not pipeline K/V through cp.async: {r}"


# ---------------------------------------------------------------- subprocess side

_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int32": "i32",
          "int64": "i64"}


def _compile_launch(jit_fn, label, args, kwargs, report):
    """Compile one intercepted launch for sm_90 and record its resource usage."""
    import inspect

    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    bound = inspect.signature(jit_fn.fn).bind(*args, **kwargs).arguments
    sig, consts, attrs = {}, {}, {}
    for i, p in enumerate(jit_fn.params):
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name], consts[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + _TYPES[str(v.dtype).split(".")[1]]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(jit_fn, sig, consts, attrs),
                            target=GPUTarget("cuda", 90, 32), options=opts)
    report[label] = _sass_stats(kernel.asm["cubin"], kernel.metadata.shared)


def _sass_stats(cubin: bytes, shared: int) -> dict:
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return {"regs": int(regs), "stack": int(stack), "smem": shared,
            "mma": len(re.findall(r"\bH[G]?MMA", sass)), "cp_async": sass.count("LDGSTS")}


def _run_all(report, current):
    """Call every wrapper with model-like shapes; `current[0]` labels the launches."""
    import torch

    import pdmesh.kernels as K

    bf = torch.bfloat16
    for dt, tag in ((bf, "bf16"), (torch.float32, "fp32")):
        for d, hkv, group in ((128, 8, 4), (64, 3, 3)):  # Llama-3-8B, SmolLM2-135M
            kv = torch.zeros(64, 3, 16, 2, hkv, d, dtype=dt)  # [P, L, page, 2, Hkv, D]
            tables = torch.zeros(2, 64, dtype=torch.int32)
            lens = torch.tensor([400, 1024], dtype=torch.int32)
            for splits in (1, 8):
                current[0] = f"decode_{tag}_d{d}_g{group}_s{splits}"
                K.paged_decode_attention(torch.zeros(2, hkv * group, d, dtype=dt), kv[:, 1],
                                         tables, lens, num_splits=splits)
            cu = torch.tensor([0, 200, 400], dtype=torch.int32)
            current[0] = f"prefill_{tag}_d{d}_g{group}"
            K.prefill_attention(torch.zeros(400, hkv * group, d, dtype=dt), kv[:, 1], tables,
                                cu, lens, 200)
    t, h, hkv, d = 4, 32, 8, 128
    qkv = torch.zeros(t, (h + 2 * hkv) * d, dtype=bf)
    q, k = qkv[:, : h * d].view(t, h, d), qkv[:, h * d: (h + hkv) * d].view(t, hkv, d)
    v = qkv[:, (h + hkv) * d:].view(t, hkv, d)
    kv = torch.zeros(4, 3, 16, 2, hkv, d, dtype=bf)
    slots = torch.zeros(t, dtype=torch.long)
    pos = torch.zeros(t, dtype=torch.long)
    cache = torch.zeros(64, d)
    for label, call in (
            ("rotary", lambda: K.rotary_embedding(q, k, pos, cache, inplace=True)),
            ("rotary_store", lambda: K.rotary_embedding(q, k, pos, cache, True, v=v,
                                                        kv_layer=kv[:, 1], slot_mapping=slots)),
            ("kv_store", lambda: K.kv_store(k, v, kv[:, 1], slots)),
            ("rms_norm", lambda: K.rms_norm(torch.zeros(t, 4096, dtype=bf),
                                            torch.zeros(4096, dtype=bf), 1e-5)),
            ("fused_add_rms_norm", lambda: K.fused_add_rms_norm(
                torch.zeros(t, 576, dtype=bf), torch.zeros(t, 576, dtype=bf),
                torch.zeros(576, dtype=bf), 1e-5)),
            ("silu_and_mul", lambda: K.silu_and_mul(torch.zeros(t, 2 * 14336, dtype=bf)))):
        current[0] = label
        call()
    _run_gemv(current)


def _run_gemv(current):
    """Every fused-GEMV config the runtime may pick, in its heaviest form (gate_up with the
    norm prologue and SiLU-and-mul: two accumulators), at the 8B shape."""
    import torch

    from pdmesh.kernels.gemv import CONFIGS, fused_gemv

    bf = torch.bfloat16
    w, g = torch.zeros(2 * 14336, 4096, dtype=bf), torch.zeros(4096, dtype=bf)
    for rows, configs in CONFIGS.items():
        for cfg in configs:
            current[0] = f"gemv_r{rows}_" + "_".join(str(int(c)) for c in cfg)
            fused_gemv(torch.zeros(rows, 4096, dtype=bf), w, norm_weight=g, silu_mul=True,
                       config=cfg)


def _main() -> int:
    try:
        import triton
        from triton.runtime.jit import JITFunction
        if not (Path(triton.__file__).parent / "backends/nvidia/bin/ptxas").exists():
            raise ImportError("no ptxas in this triton build")
        if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 3):
            raise ImportError(f"triton {triton.__version__} < 3.3 (older ASTSource attrs API)")
    except ImportError as e:
        print(f"cannot compile for CUDA here: {e}")
        return 3
    report, current, seen = {}, [""], {}

    def fake_run(self, *args, grid, warmup, **kwargs):
        n = seen[current[0]] = seen.get(current[0], 0) + 1
        label = current[0] if n == 1 else f"{current[0]}_{self.fn.__name__.strip('_')}"
        _compile_launch(self, label, args, dict(kwargs), report)

    JITFunction.run = fake_run
    _run_all(report, current)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
