"""Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3, SmolLM2) over a paged KV pool.

Parameter names follow Hugging Face's except two fusions made at load time:
q/k/v projections -> `qkv_proj`, gate/up -> `gate_up_proj` (fewer, larger matmuls).
`CausalLM.set_reference_numerics` switches to transformers' op order (see there).
Shapes: T = tokens in the flat batch, D = hidden, H/Hkv = heads, Dh = head dim.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.config import ModelConfig
from pdmesh.rope import apply_rope, rope_inv_freq  # (fused, gguf_loader take them from here)
from pdmesh.runtime.attention import AttnMetadata, TorchAttention


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # computed in float32 as Hugging Face does, then cast back
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.hkv, self.dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.h * self.dh, self.hkv * self.dh
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.dh, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.attn = TorchAttention(self.h, self.hkv, self.dh)
        self.reference = False  # separate q/k/v GEMMs (CausalLM.set_reference_numerics)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x: [T, D] -> q [T, H*Dh], k, v [T, Hkv*Dh]."""
        nq, nkv = self.h * self.dh, self.hkv * self.dh
        if not self.reference:
            return self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
        # three GEMMs of transformers' shapes: row slices of the contiguous fused [N, D]
        # weight are contiguous, so each is exactly a q_proj / k_proj / v_proj weight
        w, b = self.qkv_proj.weight, self.qkv_proj.bias
        cuts = ((0, nq), (nq, nq + nkv), (nq + nkv, nq + 2 * nkv))
        return tuple(F.linear(x, w[a:z], None if b is None else b[a:z]) for a, z in cuts)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self._qkv(x)
        q, k, v = q.view(t, self.h, self.dh), k.view(t, self.hkv, self.dh), v.view(t, self.hkv, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.attn.store(kv_layer, k, v, meta)
        out = self.attn.forward(q, kv_layer, meta)  # [T, H, Dh]
        return self.o_proj(out.reshape(t, self.h * self.dh))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)
        self.reference = False  # separate gate and up GEMMs (CausalLM.set_reference_numerics)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference:  # transformers' gate_proj and up_proj shapes (row-slice views)
            w = self.gate_up_proj.weight
            gate, up = F.linear(x, w[: self.inter]), F.linear(x, w[self.inter:])
        else:
            gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv_layer, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus LM head. `forward` fills KV pages and returns hidden states."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._head_t: torch.Tensor | None = None
        self.reference = False
        # rotary inverse frequencies [Dh/2], float32 at every model dtype (as transformers
        # keeps them): not a buffer, which `.to(bfloat16)` would round
        self._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv: [P, L, page, 2, Hkv, Dh] -> hidden [T, D]."""
        freqs = positions[:, None].float() * self._rope_inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, Dh]
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, kv[:, i], meta)
        return self.model.norm(x)

    def _rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        """[Dh/2] float32 on `device` (moved once)."""
        if self._inv_freq.device != device:
            self._inv_freq = self._inv_freq.to(device)
        return self._inv_freq

    def set_reference_numerics(self, on: bool = True) -> None:
        """Compute as transformers' LlamaModel does, op for op, so bf16 rounds the same:
        separate q/k/v and gate/up GEMMs (views of the fused weights), the torch attention
        backend calling SDPA on 4-D [1, H, S, Dh] inputs, and the LM head as F.linear on
        every device. Off: the fast path."""
        self.reference = on
        for layer in self.model.layers:
            a = layer.self_attn
            a.reference = layer.mlp.reference = on
            a.attn = TorchAttention(a.h, a.hkv, a.dh, hf_layout=on)

    def set_attention_backend(self, backend_cls) -> None:
        """Give every layer an instance of `backend_cls` (see attention.py's registry)."""
        for layer in self.model.layers:
            a = layer.self_attn
            a.attn = backend_cls(a.h, a.hkv, a.dh)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, D] -> float32 logits [B, V]."""
        if hidden.device.type != "cpu" or self.reference:
            return self.lm_head(hidden).float()
        if self._head_t is None or self._head_t.device != hidden.device:
            # [D, V] copy: on CPU, x @ W_t runs the vocab-sized matmul ~1.7x faster than
            # F.linear at batch 1 (measured with MKL on 2 cores) and no slower at batch 32
            self._head_t = self.lm_head.weight.detach().t().contiguous()
        return (hidden @ self._head_t).float()

    def load_hf_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Load a Hugging Face-named state dict, fusing qkv and gate/up; strict on names."""
        own = dict(self.named_parameters())
        done: set[str] = set()
        for name, p in own.items():
            src = _hf_sources(name, self.cfg)
            missing = [s for s in src if s not in weights]
            if missing:
                raise ValueError(f"weights lack {', '.join(missing)}")
            t = torch.cat([weights[s] for s in src], dim=0) if len(src) > 1 else weights[src[0]]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{'+'.join(src)}: shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
            done.update(src)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if self.cfg.tie_word_embeddings:
            done.add("lm_head.weight")  # some tied checkpoints also store it
        extra = [k for k in weights if k not in done and "rotary_emb" not in k]
        if extra:
            raise ValueError(f"unexpected weights: {', '.join(sorted(extra)[:5])}")


def _hf_sources(name: str, cfg: ModelConfig) -> list[str]:
    """HF tensor names that make up our parameter `name`."""
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        return ["model.embed_tokens.weight"]
    if ".qkv_proj." in name:
        return [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    if ".gate_up_proj." in name:
        return [name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")]
    return [name]
