"""Fast CausalLM forwards: the same function as model.py's torch path (CausalLM.forward),
in fewer and faster ops. `FusedForward` (CUDA): fused Triton ops and no host syncs, so it
can be captured in a CUDA graph. `CpuForward` (CPU): oneDNN linears on packed weights (see
there).

Per layer: fused residual add + RMSNorm, one qkv matmul, rotary on q/k in place (views
of the qkv output), KV store + paged attention through the layer's attention backend,
o_proj, fused add + RMSNorm, gate_up matmul, SiLU-and-mul, down_proj. Rounding follows
the torch path: x + residual is rounded to the activation dtype before it is normalised.

At 1-4 rows (decode at small batch, where every linear streams its whole weight) the
norms, SiLU-and-mul and residual adds fold into the GEMVs (decode_gemv.py): per layer
qkv(+norm), rotary+store, attention, o(+residual), gate_up(+norm, silu), down(+residual).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from pdmesh.runtime.model import CausalLM, rope_inv_freq


class FusedForward:
    """Callable (input_ids [T], positions [T], kv [P, L, page, 2, Hkv, Dh], meta) -> hidden [T, D]."""

    def __init__(self, lm: CausalLM, device: torch.device) -> None:
        from pdmesh import kernels  # noqa: F401  (fails early where Triton is missing)
        from pdmesh.kernels.activation import silu_and_mul
        from pdmesh.kernels.rmsnorm import fused_add_rms_norm, rms_norm
        from pdmesh.kernels.rotary import rotary_embedding

        from pdmesh.runtime.triton_linear import LinearDispatch

        self.lm, self.cfg = lm, lm.cfg
        self.linear = LinearDispatch()  # cuBLAS unless tune_decode_linears found better
        from pdmesh.runtime.decode_gemv import MAX_ROWS, SmallBatchLinears

        self.gemv = SmallBatchLinears()
        self.small_rows = MAX_ROWS  # forwards of at most this many rows take _small_batch
        self.rms_norm, self.add_rms_norm = rms_norm, fused_add_rms_norm
        self.silu_and_mul, self.rotary = silu_and_mul, rotary_embedding
        c = self.cfg
        inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # [Dh/2]
        freqs = torch.arange(c.max_position_embeddings).float()[:, None] * inv[None, :]
        # fp32 [max_pos, Dh]: cos | sin, the values CausalLM.forward computes per position
        self.cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)

    def tune_decode_linears(self) -> dict[str, float]:
        """Time cuBLAS against the skinny Triton matmul for every decode linear (rows 1 and
        16) and keep the faster per weight, and pick the fused GEMV's configs (rows 1-4);
        returns the speedups over cuBLAS by shape (fused GEMVs: "gemv role@rows")."""
        mods = [self.lm.lm_head]
        for layer in self.lm.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            mods += [a.qkv_proj, a.o_proj, mlp.gate_up_proj, mlp.down_proj]
        report = self.linear.tune(mods)
        gemv = self.gemv.tune(self.lm.model.layers[0], self.cfg.rms_norm_eps)
        self.small_rows = self.gemv.worth_rows()
        return report | {f"gemv {k}": v for k, v in gemv.items()} | {"gemv rows": self.small_rows}

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> float32 logits [B, V] (the lm_head through the dispatch)."""
        return self.linear(self.lm.lm_head, hidden).float()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                 meta) -> torch.Tensor:
        if 0 < input_ids.shape[0] <= self.small_rows:
            return self._small_batch(input_ids, positions, kv, meta)
        m, eps = self.lm.model, self.cfg.rms_norm_eps
        x = m.embed_tokens(input_ids)  # [T, D]
        residual = None
        for i, layer in enumerate(m.layers):
            if residual is None:
                residual = x
                h = self.rms_norm(x, layer.input_layernorm.weight, eps)
            else:
                h, residual = self.add_rms_norm(x, residual, layer.input_layernorm.weight, eps)
            x = self._attention(layer.self_attn, h, positions, kv[:, i], meta)
            h, residual = self.add_rms_norm(x, residual, layer.post_attention_layernorm.weight, eps)
            x = self.linear(layer.mlp.down_proj,
                            self.silu_and_mul(self.linear(layer.mlp.gate_up_proj, h)))
        out, _ = self.add_rms_norm(x, residual, m.norm.weight, eps)
        return out

    def _small_batch(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                     meta) -> torch.Tensor:
        """T <= small_rows: six kernels per layer; x is the residual stream, updated in place."""
        m, eps, g = self.lm.model, self.cfg.rms_norm_eps, self.gemv
        x = m.embed_tokens(input_ids)  # [T, D]
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            qkv = g(a.qkv_proj, x, norm_weight=layer.input_layernorm.weight, eps=eps)
            g(a.o_proj, self._attend(a, qkv, positions, kv[:, i], meta), residual=x, out=x)
            act = g(mlp.gate_up_proj, x, norm_weight=layer.post_attention_layernorm.weight,
                    eps=eps, silu_mul=True)  # [T, I]
            g(mlp.down_proj, act, residual=x, out=x)
        return self.rms_norm(x, m.norm.weight, eps)

    def _attention(self, a, h: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                   meta) -> torch.Tensor:
        out = self._attend(a, self.linear(a.qkv_proj, h), positions, kv_layer, meta)
        return self.linear(a.o_proj, out)

    def _attend(self, a, qkv: torch.Tensor, positions: torch.Tensor, kv_layer: torch.Tensor,
                meta) -> torch.Tensor:
        """qkv: [T, (H + 2 Hkv) Dh] -> attention output [T, H Dh] (rotary, KV store, attend)."""
        t, nq, nkv = qkv.shape[0], a.h * a.dh, a.hkv * a.dh
        q = qkv[:, :nq].view(t, a.h, a.dh)
        k = qkv[:, nq: nq + nkv].view(t, a.hkv, a.dh)
        v = qkv[:, nq + nkv:].view(t, a.hkv, a.dh)
        if a.q_norm is not None:  # qwen3: per-head RMSNorm before rotary
            q = self.rms_norm(q, a.q_norm.weight, a.q_norm.eps)
            k = self.rms_norm(k, a.k_norm.weight, a.k_norm.eps)
        slots = getattr(meta, "slot_mapping", None)
        if slots is not None:  # triton backend: rotary + KV store in one launch
            self.rotary(q, k, positions, self.cos_sin, inplace=True, v=v, kv_layer=kv_layer,
                        slot_mapping=slots)
        else:
            q, k = self.rotary(q, k, positions, self.cos_sin, inplace=True)
            a.attn.store(kv_layer, k, v, meta)
        return a.attn.forward(q, kv_layer, meta).reshape(t, nq)  # [T, H, Dh] -> [T, H Dh]


def keep_freed_memory() -> None:
    """glibc malloc: serve blocks up to 32 MiB from the heap and keep freed memory there,
    instead of mmap/munmap per large tensor. The CPU forward allocates MBs per op at prefill
    sizes (scores, activations); returning them to the kernel makes every next one fault
    its pages in again, which on this project's VMs costs more than the op (bf16 eager
    attention over 256 tokens: 3.3 ms -> 0.76 ms). Process-wide; no-op off glibc."""
    global _KEPT
    if _KEPT:
        return
    _KEPT = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


_KEPT = False


def onednn_linear_supported(dtype: torch.dtype) -> bool:
    """True where torch's oneDNN (mkldnn) linear runs `dtype` natively on this CPU."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        return dtype == torch.float32 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class CpuForward:
    """Callable (input_ids [T], positions [T], kv, meta) -> hidden [T, D] on CPU, for
    numerics="fast" (ModelRunner picks it there; "reference" keeps CausalLM.forward).

    - Linears through oneDNN on weights packed once at load (torch.ops.mkldnn, as
      inductor's CPU backend does): in bf16 the same kernels as F.linear, ~1.4x faster at
      decode sizes without the per-call weight reorder; in fp32 2-4x faster than F.linear's
      MKL sgemm on AMD CPUs (rounding then differs from F.linear's by ulps). The packed
      copies are held beside the module weights (weights twice in memory).
    - RMSNorm as one F.rms_norm in float32 then the weight multiply (transformers' rounding).
    - Rotary: cos/sin per position from a cached float32 table, q and k rotated in one pass.
    - Attention: the layer's TorchAttention, given this forward's K/V so that a prompt
      without a cached prefix attends over them without reading its pages back (bf16
      prefill: TorchAttention._eager).
    - glibc keeps freed memory in the heap (keep_freed_memory).
    - One flat loop over layers (no module calls).
    """

    def __init__(self, lm: CausalLM) -> None:
        keep_freed_memory()
        self.lm, self.cfg = lm, lm.cfg
        c, m = self.cfg, lm.model
        self.dtype = m.embed_tokens.weight.dtype
        self.onednn = onednn_linear_supported(self.dtype)
        self.head = self._weight(lm.lm_head)
        self.layers = []
        for layer in m.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight.detach(), self._weight(a.qkv_proj),
                None if a.qkv_proj.bias is None else a.qkv_proj.bias.detach(),
                self._weight(a.o_proj), layer.post_attention_layernorm.weight.detach(),
                self._weight(mlp.gate_up_proj), self._weight(mlp.down_proj), a))
        self.norm_w = m.norm.weight.detach()
        self._inv = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # [Dh/2] fp32
        self._cos = self._sin = torch.empty(0, c.head_dim)
        self._table_len(min(4096, c.max_position_embeddings))

    def _weight(self, lin: torch.nn.Linear) -> torch.Tensor:
        w = lin.weight.detach()
        return torch.ops.mkldnn._reorder_linear_weight(w) if self.onednn else w

    def _linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None):
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)

    def _table_len(self, n: int) -> None:
        """Grow the float32 cos/sin tables [n, Dh] to cover positions < n: the values
        CausalLM.forward computes per position (positions * inv_freq, both halves)."""
        if n <= self._cos.shape[0]:
            return
        n = max(n, 2 * self._cos.shape[0])
        freqs = torch.arange(n).float()[:, None] * self._inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self._cos, self._sin = emb.cos(), emb.sin()

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> float32 logits [B, V]."""
        return self._linear(hidden, self.head).float()

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                 meta) -> torch.Tensor:
        c, dt, lin = self.cfg, self.dtype, self._linear
        t, eps, dim = input_ids.shape[0], c.rms_norm_eps, (c.hidden_size,)
        h, hkv, dh = c.num_heads, c.num_kv_heads, c.head_dim
        nq, nkv, inter = h * dh, hkv * dh, c.intermediate_size
        self._table_len(int(positions.max()) + 1)
        cos = self._cos[positions].to(dt)[:, None, :]  # [T, 1, Dh]
        sin = self._sin[positions].to(dt)[:, None, :]
        half = dh // 2
        x = self.lm.model.embed_tokens(input_ids)  # [T, D], the residual stream
        for i, (w_in, w_qkv, b_qkv, w_o, w_post, w_gu, w_down, a) in enumerate(self.layers):
            hs = F.rms_norm(x.float(), dim, None, eps).to(dt) * w_in
            qkv = lin(hs, w_qkv, b_qkv)  # [T, nq + 2 nkv]
            v = qkv[:, nq + nkv:].view(t, hkv, dh)
            if a.q_norm is None:  # rotary on q and k together: [T, H + Hkv, Dh]
                qk = qkv[:, : nq + nkv].view(t, h + hkv, dh)
                x1, x2 = qk[..., :half], qk[..., half:]
                qk = qk * cos + torch.cat((-x2, x1), dim=-1) * sin
                q, k = qk[:, :h], qk[:, h:]
            else:  # qwen3: per-head RMSNorm on q and k before rotary
                q = a.q_norm(qkv[:, :nq].view(t, h, dh))
                k = a.k_norm(qkv[:, nq: nq + nkv].view(t, hkv, dh))
                q = q * cos + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin
                k = k * cos + torch.cat((-k[..., half:], k[..., :half]), dim=-1) * sin
            kv_layer = kv[:, i]
            a.attn.store(kv_layer, k, v, meta)
            out = a.attn.forward(q, kv_layer, meta, k, v)  # [T, H, Dh]
            x = x + lin(out.reshape(t, nq), w_o)
            hs = F.rms_norm(x.float(), dim, None, eps).to(dt) * w_post
            gu = lin(hs, w_gu)  # [T, 2 I]
            act = F.silu(gu[:, :inter])
            x = x + lin(act.mul_(gu[:, inter:]), w_down)
        return F.rms_norm(x.float(), dim, None, eps).to(dt) * self.norm_w
