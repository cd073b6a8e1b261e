"""The decoder's linears at batch 1-4 as fused GEMVs (kernels/gemv.py), with a config per
weight shape and fused variant timed once per machine (pdmesh/runtime/tuning_cache.py).

Variants (what is folded into the GEMV): "norm" (qkv: input RMSNorm), "norm_silu"
(gate_up: post-attention RMSNorm + SiLU-and-mul), "residual" (o_proj, down_proj: the
residual add). Untuned shapes use the kernel's default config. A row bucket is worth
fusing when its four GEMVs together take no longer than cuBLAS's four linears plus the
small kernels they absorb (KERNEL_US each); `tune` says up to how many rows that holds.
"""
from __future__ import annotations

import torch

from pdmesh.kernels.gemv import CONFIGS, MAX_ROWS, fused_gemv, fused_gemv_ref, row_bucket
from pdmesh.runtime import tuning_cache

__all__ = ["MAX_ROWS", "SmallBatchLinears"]
KERNEL_US = 2.0  # an H100's RMSNorm / SiLU-and-mul / split-K reduce at decode sizes (measured)


def _variant(kw: dict) -> str:
    if kw.get("silu_mul"):
        return "norm_silu" if kw.get("norm_weight") is not None else "silu"
    if kw.get("norm_weight") is not None:
        return "norm"
    return "residual" if kw.get("residual") is not None else "plain"


class SmallBatchLinears:
    """Callable (module, x [M <= 4, K], **fused_gemv kwargs) -> [M, N] through fused_gemv."""

    def __init__(self) -> None:
        self.configs: dict[tuple, tuple] = {}  # (N, K, dtype, variant, bucket) -> config
        self.times: dict[int, list[tuple[float, float]]] = {}  # rows -> [(fused, cuBLAS) ms]

    def _key(self, w: torch.Tensor, rows: int, kw: dict) -> tuple:
        return (*w.shape, w.dtype, _variant(kw), row_bucket(rows))

    def __call__(self, module: torch.nn.Module, x: torch.Tensor, **kw) -> torch.Tensor:
        cfg = self.configs.get(self._key(module.weight, x.shape[0], kw))
        return fused_gemv(x, module.weight, bias=module.bias, config=cfg, **kw)

    def tune(self, layer: torch.nn.Module, eps: float) -> dict[str, float]:
        """Time every config for one decoder layer's four linears (rows 1 and 4) and keep
        the fastest; returns {"role@rows": cuBLAS F.linear time / fused GEMV time}. Then
        `worth_rows()` says how many rows to fuse."""
        a, mlp = layer.self_attn, layer.mlp
        d = a.o_proj.weight.shape[0]
        roles = {"qkv": (a.qkv_proj, dict(norm_weight=layer.input_layernorm.weight, eps=eps)),
                 "o": (a.o_proj, dict(residual=d)),
                 "gate_up": (mlp.gate_up_proj,
                             dict(norm_weight=layer.post_attention_layernorm.weight, eps=eps,
                                  silu_mul=True)),
                 "down": (mlp.down_proj, dict(residual=d))}
        report = {}
        for role, (mod, kw) in roles.items():
            for rows in (1, MAX_ROWS):
                report[f"{role}@{rows}"] = self._pick(mod, rows, kw)
        return report

    def worth_rows(self) -> int:
        """The largest tuned row count whose fused layer is no slower than the unfused one."""
        ok = [rows for rows, ts in self.times.items()
              if sum(f for f, _ in ts) <= sum(c for _, c in ts) + len(ts) * KERNEL_US / 1e3]
        return max(ok, default=0)

    def _pick(self, mod: torch.nn.Module, rows: int, kw: dict) -> float:
        w = mod.weight
        k = tuning_cache.key("gemv", torch.cuda.get_device_name(w.device), tuple(w.shape),
                             w.dtype, _variant(kw), rows, mod.bias is not None)
        best, best_t, base = tuning_cache.cached(k, lambda: _time_configs(mod, rows, kw))
        self.configs[self._key(w, rows, kw)] = tuple(best)
        self.times.setdefault(rows, []).append((best_t, base))
        return round(base / best_t, 2)


def _time_configs(mod: torch.nn.Module, rows: int, kw: dict) -> list:
    """[best config, its ms, cuBLAS F.linear ms] for `mod` at `rows` rows."""
    from triton.runtime.errors import OutOfResources
    from triton.testing import do_bench

    w = mod.weight
    x = torch.randn(rows, w.shape[1], device=w.device, dtype=w.dtype)
    kw = dict(kw)
    if "residual" in kw:
        kw["residual"] = torch.randn(rows, kw["residual"], device=w.device, dtype=w.dtype)
    ref = fused_gemv_ref(x, w, bias=mod.bias, **kw).float()
    best, best_t = None, float("inf")
    for cfg in CONFIGS[row_bucket(rows)]:
        try:
            got = fused_gemv(x, w, bias=mod.bias, config=cfg, **kw).float()
        except OutOfResources:  # e.g. fp32 tiles of a bf16-sized config: not a candidate
            continue
        if not (got - ref).norm() <= 2e-2 * ref.norm():  # never keep a wrong config
            continue
        t = do_bench(lambda: fused_gemv(x, w, bias=mod.bias, config=cfg, **kw),
                     warmup=5, rep=25, return_mode="median")
        if t < best_t:
            best, best_t = cfg, t
    if best is None:
        raise RuntimeError(f"no fused GEMV config computes {tuple(w.shape)} correctly")
    base = do_bench(lambda: torch.nn.functional.linear(x, w, mod.bias), warmup=5, rep=25,
                    return_mode="median")
    return [list(best), best_t, base]
