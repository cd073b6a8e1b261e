"""One rank's slice of a Llama-family decoder: the runtime's forward (CausalLM.forward,
model.py) with collectives where the sharding needs them.

Per layer: RMSNorm (replicated) -> column-parallel qkv (this rank's heads) -> rotary ->
paged attention over this rank's KV heads (the runtime's TorchAttention; on CUDA the
backend set by set_attention_backend, Triton) -> row-parallel o_proj -> all-reduce ->
residual; RMSNorm -> column-parallel gate/up -> SiLU * up -> row-parallel down_proj ->
all-reduce -> residual. The embedding is vocab-parallel (each
rank looks up its vocab range, zeros elsewhere, all-reduce: exact, one non-zero term);
the LM head gives each rank's vocab range of the logits, all-gathered.

The same ops in the same order as CausalLM.forward, so TP=1 here computes bit for bit
what the runtime's torch path computes; at TP>1 only the all-reduce's summation order
differs (float rounding, not the math).
Shapes: T tokens, D hidden, h/hkv = this rank's heads, Dh head dim, i = I / tp.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from pdmesh.rope import apply_rope, rope_inv_freq
from pdmesh.runtime.attention import AttnMetadata, TorchAttention
from pdmesh.runtime.model import RMSNorm
from pdmesh.runtime.tp.comm import TPGroup
from pdmesh.runtime.tp.plan import TPPlan


class TPAttention(nn.Module):
    def __init__(self, plan: TPPlan, group: TPGroup) -> None:
        super().__init__()
        c, (self.h, self.hkv, _) = plan.cfg, plan.local_counts()
        self.dh, self.group = c.head_dim, group
        q, kv = self.h * self.dh, self.hkv * self.dh
        self.qkv_proj = nn.Linear(c.hidden_size, q + 2 * kv, bias=c.attention_bias)
        self.o_proj = nn.Linear(q, c.hidden_size, bias=False)  # [D, h*Dh]: row-parallel
        self.q_norm = RMSNorm(self.dh, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(self.dh, c.rms_norm_eps) if c.qk_norm else None
        self.attn = TorchAttention(self.h, self.hkv, self.dh)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                kv_layer: torch.Tensor, meta: AttnMetadata) -> torch.Tensor:
        t, nq, nkv = x.shape[0], self.h * self.dh, self.hkv * self.dh
        q, k, v = self.qkv_proj(x).split([nq, nkv, nkv], dim=-1)
        q = q.view(t, self.h, self.dh)
        k, v = k.view(t, self.hkv, self.dh), v.view(t, self.hkv, self.dh)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.attn.store(kv_layer, k, v, meta)
        out = self.attn.forward(q, kv_layer, meta)  # [T, h, Dh]
        return self.group.all_reduce(self.o_proj(out.reshape(t, nq)))  # partial sums -> [T, D]


class TPMLP(nn.Module):
    def __init__(self, plan: TPPlan, group: TPGroup) -> None:
        super().__init__()
        c, (_, _, self.inter), self.group = plan.cfg, plan.local_counts(), group
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * self.inter, bias=False)  # [2i, D]
        self.down_proj = nn.Linear(self.inter, c.hidden_size, bias=False)  # [D, i]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.group.all_reduce(self.down_proj(F.silu(gate) * up))


class TPDecoderLayer(nn.Module):
    def __init__(self, plan: TPPlan, group: TPGroup) -> None:
        super().__init__()
        c = plan.cfg
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = TPAttention(plan, group)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = TPMLP(plan, group)

    def forward(self, x, cos, sin, kv_layer, meta):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_layer, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class TPCausalLM(nn.Module):
    """Rank `plan.rank`'s shard of the model. Every rank calls `forward` and `logits` on
    the same inputs in the same order (they run collectives)."""

    def __init__(self, plan: TPPlan, group: TPGroup) -> None:
        super().__init__()
        c = plan.cfg
        self.plan, self.cfg, self.group = plan, c, group
        self.embed_tokens = nn.Embedding(plan.vocab_per_rank, c.hidden_size)  # padded rows
        self.layers = nn.ModuleList(TPDecoderLayer(plan, group) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, plan.vocab_per_rank, bias=False)
        self._inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)  # fp32

    def set_attention_backend(self, backend_cls) -> None:
        """Give every layer an instance of `backend_cls` over this rank's heads (see
        attention.py's registry; the torch backend is the default)."""
        for layer in self.layers:
            a = layer.self_attn
            a.attn = backend_cls(a.h, a.hkv, a.dh)

    def kv_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        """This rank's KV pool shape [P, L, page, 2, hkv, Dh] (its own KV heads only)."""
        hkv = self.plan.local_counts()[1]
        return (num_pages, self.cfg.num_layers, page_size, 2, hkv, self.cfg.head_dim)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Vocab-parallel lookup: [T] -> [T, D], summed over ranks."""
        v0, v1 = self.plan.vocab
        mine = (input_ids >= v0) & (input_ids < v1)
        x = self.embed_tokens(torch.where(mine, input_ids - v0, 0))
        if self.group.size == 1:
            return x
        return self.group.all_reduce(x * mine[:, None].to(x.dtype))

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                meta: AttnMetadata) -> torch.Tensor:
        """input_ids, positions: [T]; kv: this rank's pool -> hidden [T, D] (replicated)."""
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[:, None].float() * self._inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, Dh]
        dtype = self.embed_tokens.weight.dtype
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv[:, i], meta)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, D] -> float32 logits [B, V] over the whole vocab (all-gathered)."""
        local = self.lm_head(hidden).float()  # [B, V / tp rounded up]
        return self.group.all_gather_last(local)[:, : self.cfg.vocab_size]

    @classmethod
    def from_shards(cls, plan: TPPlan, group: TPGroup,
                    weights: Mapping[str, torch.Tensor]) -> "TPCausalLM":
        """Build the rank's model around its shards (shard.py) without allocating or
        initialising parameters first: modules are made on the meta device, then take
        the shard tensors as their parameters (fused q/k/v and gate/up are new tensors)."""
        with torch.device("meta"):
            model = cls(plan, group)
        c = plan.cfg
        model._inv_freq = rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling)
        model.load_state_dict(model._state_from(weights), strict=True, assign=True)
        if c.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        return model

    def _state_from(self, weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Our parameter names -> tensors from HF-named shards, fusing q/k/v and gate/up as
        the runtime does; strict on names and shapes."""
        state: dict[str, torch.Tensor] = {}
        done: set[str] = set()
        for name, p in self.named_parameters():
            src = _sources(name, self.cfg.tie_word_embeddings)
            missing = [s for s in src if s not in weights]
            if missing:
                raise ValueError(f"shard lacks {', '.join(missing)}")
            t = torch.cat([weights[s] for s in src]) if len(src) > 1 else weights[src[0]]
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"{'+'.join(src)}: shard shape {tuple(t.shape)}, "
                                 f"expected {tuple(p.shape)}")
            state[name] = t
            done.update(src)
        extra = sorted(set(weights) - done)
        if extra:
            raise ValueError(f"unexpected weights: {', '.join(extra[:5])}")
        return state


def _sources(name: str, tied: bool) -> list[str]:
    """HF tensor names that make up our parameter `name`."""
    if name == "lm_head.weight":
        return ["model.embed_tokens.weight" if tied else "lm_head.weight"]
    name = name if name.startswith("lm_head") else f"model.{name}"
    if ".qkv_proj." in name:
        return [name.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")]
    if ".gate_up_proj." in name:
        return [name.replace("gate_up_proj", p) for p in ("gate_proj", "up_proj")]
    return [name]


__all__ = ["TPCausalLM"]
