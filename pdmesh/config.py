"""Frozen configuration dataclasses, one per scope, and the one place env overrides apply.

`ModelConfig` describes a Llama-family decoder (read from a HF config.json or GGUF
metadata). `EngineConfig` describes how one engine runs it (KV pool, batching limits).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Mapping

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style rope scaling ("llama3"); other types are refused at load."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: bias on q/k/v projections
    qk_norm: bool = False  # qwen3: RMSNorm on q and k per head
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict; raises ValueError naming what is wrong."""
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_ARCHS:
            raise ValueError(
                f"unsupported architecture {model_type!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks required fields: {', '.join(missing)}")
        heads = int(cfg["num_attention_heads"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
        theta = cfg.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
        return cls(
            arch=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=_rope_scaling(rope),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _rope_scaling(rope: Mapping[str, Any] | None) -> RopeScaling | None:
    if not rope:
        return None
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind == "default":
        return None
    if kind != "llama3":
        raise ValueError(f"unsupported rope scaling {kind!r} (supported: llama3)")
    return RopeScaling(
        rope_type="llama3",
        factor=float(rope["factor"]),
        low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 8192)),
    )


@dataclass(frozen=True)
class EngineConfig:
    """How one engine runs a model: device, KV pool and batching limits."""

    model: str = "default"
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    page_size: int = 16  # tokens per KV page
    kv_cache_bytes: int = 1 << 30  # KV pool budget (all layers, K and V)
    num_pages: int | None = None  # overrides kv_cache_bytes when set
    max_running_requests: int = 64
    max_prefill_tokens: int = 4096  # tokens per prefill step, over all requests in it
    chunked_prefill_size: int = 2048  # a longer prompt is split into chunks of this size
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads on CPU

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running_requests", "max_prefill_tokens",
                     "chunked_prefill_size", "kv_cache_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


# The one place environment variables override configuration.
_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "PDMESH_MODEL": ("model", str),
    "PDMESH_DEVICE": ("device", str),
    "PDMESH_DTYPE": ("dtype", str),
    "PDMESH_PAGE_SIZE": ("page_size", int),
    "PDMESH_KV_CACHE_BYTES": ("kv_cache_bytes", int),
    "PDMESH_MAX_RUNNING_REQUESTS": ("max_running_requests", int),
    "PDMESH_MAX_PREFILL_TOKENS": ("max_prefill_tokens", int),
    "PDMESH_CHUNKED_PREFILL_SIZE": ("chunked_prefill_size", int),
}


def engine_config_from_env(base: EngineConfig | None = None,
                           env: Mapping[str, str] | None = None) -> EngineConfig:
    """Apply PDMESH_* environment overrides on top of `base`."""
    return _apply_env(base or EngineConfig(), _ENV_OVERRIDES, env)


def _apply_env(base: Any, overrides: Mapping[str, tuple[str, type]],
               env: Mapping[str, str] | None) -> Any:
    """`base` with the fields named in `overrides` replaced by their env values, if set."""
    env = os.environ if env is None else env
    changes: dict[str, Any] = {}
    for var, (name, kind) in overrides.items():
        if var in env:
            try:
                changes[name] = kind(env[var])
            except ValueError as e:
                raise ValueError(f"{var}={env[var]!r}: expected {kind.__name__}") from e
    return base.replace(**changes)


@dataclass(frozen=True)
class RegistryConfig:
    """Lease terms of the bootstrap registry (DESIGN.md, "Timeouts and liveness").

    A worker heartbeats every `heartbeat_interval` seconds; one that has not been
    heard from for `heartbeat_interval * heartbeat_max_failure` seconds is expired.
    """

    heartbeat_interval: float = 5.0  # seconds between a worker's heartbeats
    heartbeat_max_failure: int = 2  # missed intervals before the worker is expired

    def __post_init__(self) -> None:
        if not self.heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {self.heartbeat_interval}")
        if self.heartbeat_max_failure < 1:
            raise ValueError(f"heartbeat_max_failure must be >= 1, got {self.heartbeat_max_failure}")

    @property
    def lease_s(self) -> float:
        """Seconds of silence after which a worker is expired."""
        return self.heartbeat_interval * self.heartbeat_max_failure

    def replace(self, **changes: Any) -> "RegistryConfig":
        return dataclasses.replace(self, **changes)


_REGISTRY_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "PDMESH_HEARTBEAT_INTERVAL": ("heartbeat_interval", float),
    "PDMESH_HEARTBEAT_MAX_FAILURE": ("heartbeat_max_failure", int),
}


def registry_config_from_env(base: RegistryConfig | None = None,
                             env: Mapping[str, str] | None = None) -> RegistryConfig:
    """Apply PDMESH_HEARTBEAT_* environment overrides on top of `base`."""
    return _apply_env(base or RegistryConfig(), _REGISTRY_ENV_OVERRIDES, env)


__all__ = ["ModelConfig", "RopeScaling", "EngineConfig", "engine_config_from_env",
           "SUPPORTED_ARCHS", "RegistryConfig", "registry_config_from_env"]
