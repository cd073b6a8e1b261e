"""Cut a rank's weight shards out of HF-named weights, without keeping the full model.

`shard_weights` slices an already loaded dict (e.g. the GGUF weights cache, which is a
memory map: slicing touches only the rank's rows). `load_shard` reads a model for one
rank: a HF folder's safetensors are read slice by slice (`safe_open(...).get_slice`), so
a rank reads and holds only its own rows; a GGUF comes through the runtime's loader and
cache, then is sliced. Every shard is a fresh contiguous float32 tensor that shares no
storage with the source.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from pdmesh.config import ModelConfig
from pdmesh.runtime.loader import (load_weights_and_config, model_format, read_hf_config,
                                   resolve_model_path, safetensors_files)
from pdmesh.runtime.tp.plan import Shard, TPPlan


def _skip(name: str, cfg: ModelConfig) -> bool:
    """Tensors no rank keeps: rotary caches, and a tied checkpoint's stored lm_head."""
    return "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings)


def _cut(t, s: Shard | None) -> torch.Tensor:
    """`t` (a tensor or a safetensors slice) cut to `s` and padded: one copy, float32,
    contiguous, owning its storage (a view of a memory-mapped file would pin it)."""
    if s is None:
        part = t[:]
    else:
        part = t[s.start:s.end] if s.dim == 0 else t[:, s.start:s.end]
    out = torch.empty(part.shape, dtype=torch.float32).copy_(part)
    if s is not None and s.rows is not None and out.shape[0] < s.rows:  # vocab padding
        out = torch.cat((out, out.new_zeros(s.rows - out.shape[0], *out.shape[1:])))
    return out


def shard_weights(weights: Mapping[str, torch.Tensor], plan: TPPlan) -> dict[str, torch.Tensor]:
    """HF-named full weights -> this rank's HF-named shards (see TPPlan.shard)."""
    return {name: _cut(t, plan.shard(name)) for name, t in weights.items()
            if not _skip(name, plan.cfg)}


def read_safetensors_shard(folder: Path, plan: TPPlan) -> dict[str, torch.Tensor]:
    """A HF folder's weights for one rank, reading only the rank's slice of each tensor."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in safetensors_files(folder):
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    if not _skip(name, plan.cfg):
                        out[name] = _cut(st.get_slice(name), plan.shard(name))
        except ValueError:
            raise
        except Exception as e:  # SafetensorError, OSError on broken files
            raise ValueError(f"{f}: cannot read safetensors file ({e})") from e
    return out


def model_config(model: str | Path) -> ModelConfig:
    """`model`'s config alone (a GGUF's comes with its weights: the cache's memory map,
    or a parse)."""
    path = resolve_model_path(model)
    if model_format(path) == "hf":
        return read_hf_config(path)
    return load_weights_and_config(path)[0]


def load_shard(model: str | Path, size: int, rank: int) -> tuple[TPPlan, dict[str, torch.Tensor]]:
    """Config and this rank's HF-named weight shards for `model` ("default", a HF folder
    or a .gguf file). Raises ValueError when `size` cannot shard the model."""
    path = resolve_model_path(model)
    if model_format(path) == "hf":
        plan = TPPlan(read_hf_config(path), size, rank)
        return plan, read_safetensors_shard(path, plan)
    cfg, weights = load_weights_and_config(path)
    plan = TPPlan(cfg, size, rank)
    return plan, shard_weights(weights, plan)


__all__ = ["shard_weights", "read_safetensors_shard", "model_config", "load_shard"]
