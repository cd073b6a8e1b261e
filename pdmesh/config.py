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


NUMERICS = ("fast", "reference")  # EngineConfig.numerics
# EngineConfig.max_prefill_tokens' default on CPU (benchmarks/results/2026-11-30-cpu-vs-vllm.md)
CPU_MAX_PREFILL_TOKENS = 512


def check_numerics(numerics: str, attention_backend: str) -> bool:
    """Validate a numerics mode against the attention backend; True for "reference"."""
    if numerics not in NUMERICS:
        raise ValueError(f"numerics must be fast or reference, got {numerics!r}")
    if numerics == "reference" and attention_backend == "triton":
        raise ValueError("numerics='reference' runs the torch attention backend; "
                         "attention_backend='triton' conflicts with it (use auto or torch)")
    return numerics == "reference"


@dataclass(frozen=True)
class EngineConfig:
    """How one engine runs a model: device, KV pool and batching limits."""

    model: str = "default"
    device: str = "cpu"
    # auto: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX-BF16 (~4x faster GEMMs
    # there), float32 on other CPUs; exactness checks against transformers in fp32 pin
    # "float32" (PDMESH_DTYPE=float32), bf16 ones use numerics="reference"
    dtype: str = "auto"
    page_size: int = 16  # tokens per KV page
    kv_cache_bytes: int = 1 << 30  # KV pool budget (all layers, K and V)
    num_pages: int | None = None  # overrides kv_cache_bytes when set
    max_running_requests: int = 64
    # tokens per prefill step, over all requests in it; None = 4096 on CUDA,
    # CPU_MAX_PREFILL_TOKENS on CPU (prefill_budget())
    max_prefill_tokens: int | None = None
    chunked_prefill_size: int = 2048  # a longer prompt is split into chunks of this size
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads on CPU (decode steps)
    # torch intra-op threads for prefill steps on CPU; None = num_threads. `pdmesh serve`
    # gives a lone CPU worker every core here and one fewer for decode steps (the gateway
    # streams then; during a prefill step it idles): commands/serve.py
    prefill_threads: int | None = None
    # on CPU, the nice value (0..19) of the thread that steps the engine and of the OpenMP
    # threads it starts; 0 = unchanged. `pdmesh serve` sets 19 for a decode worker that
    # shares the cores with prefill workers, so prompts go first across processes as
    # prefill goes first inside one engine (runtime/threads.py)
    cpu_nice: int = 0
    # attention backend: "auto" = triton on CUDA; on CPU "cpu" (C++ paged decode kernel,
    # runtime/cpu_attention.py) where it builds, else "torch"
    attention_backend: str = "auto"
    cuda_graphs: bool = True  # decode under CUDA graphs (batch padded to a captured size)
    cuda_graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64)
    cuda_graph_max_context: int | None = None  # graph page-table width; default max_model_len
    # with cuda_graphs: prefill steps (any batch that is not a captured decode) of up to
    # this many new tokens replay a graph too, padded to the next size (runtime/prefill_graph.py);
    # sizes above the prefill budget are dropped; () = eager prefill
    cuda_graph_prefill_tokens: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    # "fast": fused qkv / gate_up GEMMs (+ triton, graphs on CUDA). "reference": transformers'
    # op order (separate q/k/v and gate/up GEMMs, 4-D torch SDPA, eager) to validate
    # against it; see CausalLM.set_reference_numerics
    numerics: str = "fast"
    # reuse the KV of full pages whose prompt prefix was seen before (runtime/prefix_cache.py);
    # never with numerics="reference" (transformers computes every prompt whole)
    prefix_cache: bool = True
    # with prefix_cache: adopted KV (a decode worker's PD requests) uses and fills the cache
    # too, so a prompt whose prefix is here already has only the rest transferred
    decode_prefix_cache: bool = True

    def __post_init__(self) -> None:
        for name in ("page_size", "max_running_requests", "max_prefill_tokens",
                     "chunked_prefill_size", "kv_cache_bytes", "num_threads", "prefill_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_pages is not None and self.num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {self.num_pages}")
        if not 0 <= self.cpu_nice <= 19:
            raise ValueError(f"cpu_nice must be in 0..19, got {self.cpu_nice}")
        if any(int(b) < 1 for b in self.cuda_graph_batch_sizes + self.cuda_graph_prefill_tokens):
            raise ValueError(f"cuda_graph_batch_sizes and cuda_graph_prefill_tokens must be "
                             f">= 1, got {self.cuda_graph_batch_sizes}, "
                             f"{self.cuda_graph_prefill_tokens}")
        if self.attention_backend not in ("auto", "torch", "triton", "cpu"):
            raise ValueError(f"attention_backend must be auto, torch, triton or cpu, "
                             f"got {self.attention_backend!r}")
        check_numerics(self.numerics, self.attention_backend)

    def replace(self, **changes: Any) -> "EngineConfig":
        return dataclasses.replace(self, **changes)

    def uses_prefix_cache(self) -> bool:
        """Whether the engine keeps a prefix cache: `prefix_cache`, except under
        numerics="reference" (transformers' op order computes every prompt whole; a prompt
        continued after a cached prefix rounds differently in bf16)."""
        return self.prefix_cache and self.numerics != "reference"

    def prefill_budget(self) -> int:
        """Prompt tokens per prefill step: `max_prefill_tokens`, else the device's default.
        CPU: a prefill step there runs ~1500 tokens/s per core, so a wave of prompts that
        arrive together gets its first tokens in turn, a few prompts per step, instead
        of all at the end of one step of seconds; the steps cost about the same in all."""
        if self.max_prefill_tokens is not None:
            return self.max_prefill_tokens
        return CPU_MAX_PREFILL_TOKENS if self.device == "cpu" else 4096


def _env_bool(v: str) -> bool:
    if v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


_env_bool.__name__ = "bool (1/0, true/false)"


def _env_ints(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in v.replace(",", " ").split())


_env_ints.__name__ = "comma-separated ints"


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
    "PDMESH_NUM_THREADS": ("num_threads", int),
    "PDMESH_PREFILL_THREADS": ("prefill_threads", int),
    "PDMESH_CPU_NICE": ("cpu_nice", int),
    "PDMESH_ATTENTION_BACKEND": ("attention_backend", str),
    "PDMESH_CUDA_GRAPHS": ("cuda_graphs", _env_bool),
    "PDMESH_CUDA_GRAPH_BATCH_SIZES": ("cuda_graph_batch_sizes", _env_ints),
    "PDMESH_CUDA_GRAPH_PREFILL_TOKENS": ("cuda_graph_prefill_tokens", _env_ints),
    "PDMESH_NUMERICS": ("numerics", str),
    "PDMESH_PREFIX_CACHE": ("prefix_cache", _env_bool),
    "PDMESH_DECODE_PREFIX_CACHE": ("decode_prefix_cache", _env_bool),
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
    chaos: bool = False  # serve pdmesh.v1.Chaos (fault injection; --chaos, tests only)

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
    "PDMESH_CHAOS": ("chaos", _env_bool),
}


def registry_config_from_env(base: RegistryConfig | None = None,
                             env: Mapping[str, str] | None = None) -> RegistryConfig:
    """Apply PDMESH_HEARTBEAT_* environment overrides on top of `base`."""
    return _apply_env(base or RegistryConfig(), _REGISTRY_ENV_OVERRIDES, env)


# Gateway routing names, kept here so that GatewayConfig validates them without importing
# the gateway (config sits below every service). services/gateway/pool.py routes by these
# modes; services/gateway/routing.py maps each policy name to its class, and its
# register_policy() adds plug-in names to this set.
ROUTING_MODES = ("auto", "pd", "colocated")
ROUTING_POLICIES: set[str] = {"random", "round_robin", "power_of_two", "least_load",
                              "cache_aware", "cache_cost", "prefix_hash"}
# per-request disaggregation (services/gateway/pd_mode.py): when a prefill + decode pair
# exists, prefill on the prefill worker (always), on the decode worker itself (never), or
# whichever the cost model predicts is cheaper (auto)
PD_MODES = ("always", "never", "auto")


def check_routing_policy(name: str) -> None:
    """ValueError listing the known names unless `name` is a routing policy."""
    if name not in ROUTING_POLICIES:
        raise ValueError(f"unknown routing policy {name!r} "
                         f"(known: {', '.join(sorted(ROUTING_POLICIES))})")


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway: where it listens, what it serves and how it routes."""

    registry: str = "127.0.0.1:50050"  # registry address, host:port
    model: str = "default"  # tokenizer + context length source (no weights are loaded)
    served_model_name: str | None = None  # the `model` clients pass (default: `model`)
    host: str = "127.0.0.1"  # every service binds loopback unless told otherwise
    port: int = 8000  # REST (OpenAI API); 0 = a free port
    grpc_port: int = 50051  # pdmesh.v1.Gateway; 0 = a free port
    prefill_policy: str = "round_robin"
    decode_policy: str = "round_robin"
    mode: str = "auto"  # pd | colocated | auto (PD when a pair exists, else colocated)
    # cache_aware and prefix_hash (services/gateway/routing.py); defaults: SGLang Model
    # Gateway's --cache-threshold 0.3, --balance-abs-threshold 64, --balance-rel-threshold
    # 1.5, --max-tree-size 2**26 (here token ids per worker tree, evicted LRU on insert)
    # and --prefix-token-count 256
    cache_threshold: float = 0.3  # prefix match rate above which the cache decides
    balance_abs_threshold: int = 64  # imbalanced: max - min load above this ...
    balance_rel_threshold: float = 1.5  # ... and max above min times this
    max_tree_size: int = 1 << 26
    prefix_token_count: int = 256
    # per-request disaggregation (services/gateway/pd_mode.py, pd_cost.py): the policy, the
    # cost model's starting profile (a `pdmesh plan` / `pdmesh simulate` Profile JSON; None:
    # built-in defaults, calibrated online either way), the seconds of this request's TTFT one
    # second of stall of one running decode stream is worth, and the longest stall a local
    # prefill may put on a decode's streams (auto never prefills locally beyond it)
    pd_mode: str = "always"
    pd_mode_profile: str | None = None
    pd_mode_stall_weight: float = 0.1
    pd_mode_max_stall_s: float = 0.25
    # when set, requests need "Authorization: Bearer <key>"; repr=False: never in logs
    api_key: str | None = dataclasses.field(default=None, repr=False)
    max_model_len: int | None = None  # defaults to the model's context length
    shutdown_grace_s: float = 5.0  # in-flight requests get this long to finish
    processes: int = 1  # gateway processes sharing the ports (SO_REUSEPORT)
    reuse_port: bool = False  # bind with SO_REUSEPORT (set in each of `processes`)
    # retries (services/gateway/dispatch.py): attempts in all for a request that fails
    # before its first token, full-jitter exponential backoff between them
    retry_max_attempts: int = 3
    retry_backoff_base_s: float = 0.02
    retry_backoff_cap_s: float = 0.5
    # per-worker circuit breakers (services/gateway/breaker.py); defaults: SGLang Model
    # Gateway's --cb-failure-threshold 5, --cb-success-threshold 2, --cb-timeout-duration-secs 30
    breaker_failure_threshold: int = 5
    breaker_success_threshold: int = 2
    breaker_open_s: float = 30.0
    # admission (services/gateway/admission.py), per gateway process: requests in flight
    # (0 = no limit), waiters beyond that (None = max_inflight), how long one may wait,
    # and the retry hint a turned-away client gets (429 Retry-After / gRPC retry-after)
    max_inflight: int = 0
    max_queued: int | None = None
    queue_timeout_s: float = 30.0
    retry_after_s: float = 1.0
    # request limits (services/gateway/limits.py); beyond them a request gets 400/413
    # (gRPC INVALID_ARGUMENT) naming the limit. Prompt and max_tokens are bounded by
    # max_model_len; 20 top logprobs is OpenAI's limit (and the sampler's, MAX_LOGPROBS)
    max_body_bytes: int = 32 << 20  # REST request body
    max_stop_strings: int = 16
    max_stop_chars: int = 256  # per stop string
    max_top_logprobs: int = 20
    max_n: int = 16  # choices per request (n); the workers take up to 128 (runtime MAX_N)

    def __post_init__(self) -> None:
        if self.processes < 1:
            raise ValueError(f"processes must be >= 1, got {self.processes}")
        self._check_retries()
        self._check_admission()
        self._check_limits()
        self._check_cache_routing()
        check_routing_policy(self.prefill_policy), check_routing_policy(self.decode_policy)
        if self.mode not in ROUTING_MODES:
            raise ValueError(f"mode must be one of {', '.join(ROUTING_MODES)}, got {self.mode!r}")
        self._check_pd_mode()
        for name in ("port", "grpc_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ValueError(f"{name} must be in 0..65535, got {getattr(self, name)}")

    def _check_retries(self) -> None:
        for name in ("retry_max_attempts", "breaker_failure_threshold",
                     "breaker_success_threshold"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("retry_backoff_base_s", "retry_backoff_cap_s", "breaker_open_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    def _check_admission(self) -> None:
        for name in ("max_inflight", "max_queued", "queue_timeout_s"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.retry_after_s <= 0:
            raise ValueError(f"retry_after_s must be > 0, got {self.retry_after_s}")

    def _check_limits(self) -> None:
        for name in ("max_body_bytes", "max_stop_strings", "max_stop_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_top_logprobs <= 20:  # the sampler computes at most 20
            raise ValueError(f"max_top_logprobs must be in 0..20, got {self.max_top_logprobs}")
        if not 1 <= self.max_n <= 128:  # pdmesh.runtime.sampling_params.MAX_N
            raise ValueError(f"max_n must be in 1..128, got {self.max_n}")

    def _check_cache_routing(self) -> None:
        if not 0 <= self.cache_threshold <= 1:
            raise ValueError(f"cache_threshold must be in 0..1, got {self.cache_threshold}")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold <= 0:
            raise ValueError("balance_abs_threshold must be >= 0 and balance_rel_threshold "
                             f"> 0, got {self.balance_abs_threshold}, {self.balance_rel_threshold}")
        for name in ("max_tree_size", "prefix_token_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def _check_pd_mode(self) -> None:
        if self.pd_mode not in PD_MODES:
            raise ValueError(f"pd_mode must be one of {', '.join(PD_MODES)}, "
                             f"got {self.pd_mode!r}")
        for name in ("pd_mode_stall_weight", "pd_mode_max_stall_s"):
            v = getattr(self, name)
            if not (v >= 0 and v != float("inf")):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")

    @property
    def queue_limit(self) -> int:
        """Waiters allowed beyond max_inflight (max_queued, by default max_inflight)."""
        return self.max_inflight if self.max_queued is None else self.max_queued

    def replace(self, **changes: Any) -> "GatewayConfig":
        return dataclasses.replace(self, **changes)


_GATEWAY_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "PDMESH_REGISTRY": ("registry", str),
    "PDMESH_API_KEY": ("api_key", str),
    "PDMESH_PREFILL_POLICY": ("prefill_policy", str),
    "PDMESH_DECODE_POLICY": ("decode_policy", str),
    "PDMESH_ROUTING_MODE": ("mode", str),
    "PDMESH_GATEWAY_PROCESSES": ("processes", int),
    "PDMESH_GATEWAY_RETRY_MAX_ATTEMPTS": ("retry_max_attempts", int),
    "PDMESH_GATEWAY_RETRY_BACKOFF_BASE": ("retry_backoff_base_s", float),
    "PDMESH_GATEWAY_RETRY_BACKOFF_CAP": ("retry_backoff_cap_s", float),
    "PDMESH_GATEWAY_BREAKER_FAILURES": ("breaker_failure_threshold", int),
    "PDMESH_GATEWAY_BREAKER_SUCCESSES": ("breaker_success_threshold", int),
    "PDMESH_GATEWAY_BREAKER_OPEN": ("breaker_open_s", float),
    "PDMESH_GATEWAY_MAX_INFLIGHT": ("max_inflight", int),
    "PDMESH_GATEWAY_MAX_QUEUED": ("max_queued", int),
    "PDMESH_GATEWAY_QUEUE_TIMEOUT": ("queue_timeout_s", float),
    "PDMESH_GATEWAY_RETRY_AFTER": ("retry_after_s", float),
    "PDMESH_GATEWAY_MAX_BODY_BYTES": ("max_body_bytes", int),
    "PDMESH_GATEWAY_MAX_STOP_STRINGS": ("max_stop_strings", int),
    "PDMESH_GATEWAY_MAX_STOP_CHARS": ("max_stop_chars", int),
    "PDMESH_GATEWAY_MAX_TOP_LOGPROBS": ("max_top_logprobs", int),
    "PDMESH_GATEWAY_MAX_N": ("max_n", int),
    "PDMESH_GATEWAY_CACHE_THRESHOLD": ("cache_threshold", float),
    "PDMESH_GATEWAY_BALANCE_ABS_THRESHOLD": ("balance_abs_threshold", int),
    "PDMESH_GATEWAY_BALANCE_REL_THRESHOLD": ("balance_rel_threshold", float),
    "PDMESH_GATEWAY_MAX_TREE_SIZE": ("max_tree_size", int),
    "PDMESH_GATEWAY_PREFIX_TOKEN_COUNT": ("prefix_token_count", int),
    "PDMESH_GATEWAY_PD_MODE": ("pd_mode", str),
    "PDMESH_GATEWAY_PD_MODE_PROFILE": ("pd_mode_profile", str),
    "PDMESH_GATEWAY_PD_MODE_STALL_WEIGHT": ("pd_mode_stall_weight", float),
    "PDMESH_GATEWAY_PD_MODE_MAX_STALL": ("pd_mode_max_stall_s", float),
}


def gateway_config_from_env(base: GatewayConfig | None = None,
                            env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Apply PDMESH_REGISTRY / _API_KEY / _PREFILL_POLICY / _DECODE_POLICY / _ROUTING_MODE
    and PDMESH_GATEWAY_* (processes, admission, request limits, cache-aware routing)."""
    return _apply_env(base or GatewayConfig(), _GATEWAY_ENV_OVERRIDES, env)


@dataclass(frozen=True)
class AuthConfig:
    """The cluster credential of one service process (checked and sent by pdmesh/auth.py).

    `cluster_token` is the shared secret every internal RPC (registry, workers) carries;
    None leaves internal RPCs unauthenticated. `tls_cert`/`tls_key`/`tls_ca` are PEM file
    paths (pdmesh/tls.py): TLS on every gRPC server and channel, mTLS with a CA; none:
    plaintext.
    """

    cluster_token: str | None = dataclasses.field(default=None, repr=False)  # never logged
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        token = self.cluster_token
        # gRPC metadata values are printable ASCII; a space or newline would be cut or refused
        if token is not None and (not token or any(not 33 <= ord(c) <= 126 for c in token)):
            raise ValueError("the cluster token (PDMESH_CLUSTER_TOKEN or --cluster-token-file) "
                             "must be non-empty printable ASCII without spaces (e.g. python "
                             "-c 'import secrets; print(secrets.token_urlsafe(32))')")

    def replace(self, **changes: Any) -> "AuthConfig":
        return dataclasses.replace(self, **changes)


_AUTH_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "PDMESH_CLUSTER_TOKEN": ("cluster_token", str),
    "PDMESH_TLS_CERT": ("tls_cert", str),
    "PDMESH_TLS_KEY": ("tls_key", str),
    "PDMESH_TLS_CA": ("tls_ca", str),
}


def auth_config_from_env(base: AuthConfig | None = None,
                         env: Mapping[str, str] | None = None) -> AuthConfig:
    """Apply PDMESH_CLUSTER_TOKEN and PDMESH_TLS_CERT / _KEY / _CA on top of `base`."""
    return _apply_env(base or AuthConfig(), _AUTH_ENV_OVERRIDES, env)


@dataclass(frozen=True)
class WorkerConfig:
    """A prefill, decode or colocated worker: where it serves, its peers and its timeouts.

    The engine itself is configured by EngineConfig; this is everything around it.
    """

    registry: str = "127.0.0.1:50050"  # registry address, host:port
    model_id: str = "default"  # published in the registry; P and D must agree
    host: str = "127.0.0.1"  # interface the gRPC server binds
    port: int = 0  # gRPC port; 0 = a free one
    hostname: str | None = None  # address peers reach us at (gRPC + transfer); default host
    role: str = "prefill"  # prefill | decode | colocated
    transfer_protocol: str = "tcp"  # Mooncake transport: tcp | rdma
    transfer_device: str = ""  # rdma HCAs, e.g. "mlx5_0,mlx5_1" ("" = auto)
    # KV pages on a GPU: "direct" registers device memory with Mooncake, "staged" copies
    # through a pinned host mirror; "auto" = direct if the engine can register it, else staged
    kv_transfer_mode: str = "auto"
    # prefill: the path into a decode pool on the same host (pdmesh.transfer.route):
    # auto = the fastest that works, measured when the pair binds; shm | ipc | mooncake
    kv_path: str = "auto"
    bootstrap_timeout: float = 300.0  # prefill: a room's Transfer must arrive within this
    waiting_timeout: float = 300.0  # decode: deadline on Prefill.Transfer
    shutdown_grace_s: float = 10.0  # in-flight requests get this long on SIGTERM
    # at start: how long the registry may not answer (starting, or a loaded host) before
    # the worker gives up (exit 1); a refusal (wrong token, layout) ends it at once
    registry_wait_s: float = 30.0
    stream_interval: int = 1  # decode: tokens per stream message after the first
    # The engine thread drops the GIL in every torch call and must take it back from the
    # event-loop thread, which may keep it for a whole switch interval (Python's default
    # 5 ms, longer than a GPU decode step); a short interval hands it back sooner.
    gil_switch_interval_s: float = 0.0005
    # KV integrity: "on": the prefill verifies each room's destination pages after the
    # write (one rewrite on a mismatch) and the decode its pages before adopt; "decode":
    # the decode's check only (a mismatch fails the request); "off". Default "decode":
    # with xxh3 on CPU pools it adds ~1.5 ms (0.6%) to TTFT at 256 prompt tokens through
    # serve 1P1D, +0.4 ms in process (benchmarks/results/2026-11-30-kv-checksum-cpu.md;
    # crc32 cost 2.2% on 2026-11-29); on an H200 at 4k tokens "decode" is not measurable
    # (2026-11-29-kv-paths.md)
    kv_checksum: str = "decode"
    # Load shedding (pdmesh/disagg/shedding.py): refuse a new request with
    # RESOURCE_EXHAUSTED while this many already wait on this worker; 0 = never
    shed_queued: int = 0
    # Chaos hook, tests only (services/common/kv.py CorruptKV): a prefill corrupts a
    # room's first write with this probability; `_rewrites` corrupts the rewrite too
    chaos_corrupt_kv: float = 0.0
    chaos_corrupt_kv_rewrites: bool = False
    # serve pdmesh.v1.Chaos: faults armed by RPC (services/common/chaos.py); --chaos
    chaos: bool = False
    # run the engine core (engine loop, KV pool and its transport) in a child process,
    # so the RPC event loop never takes the engine loop's GIL (pdmesh/worker/engine_proxy.py);
    # None = on when the engine runs on a GPU (measured there: benchmarks/results/), off on CPU
    engine_process: bool | None = None
    # tensor-parallel ranks of this worker's engine (pdmesh/runtime/tp/ranks.py): rank 0
    # in the engine's process schedules, ranks 1..tp-1 are child processes that follow
    tp: int = 1

    def uses_engine_process(self, engine: "EngineConfig") -> bool:
        """Whether this worker runs its engine core in a child process."""
        if self.engine_process is not None:
            return self.engine_process
        return engine.device.startswith("cuda")

    def __post_init__(self) -> None:
        if self.kv_checksum not in ("on", "decode", "off"):
            raise ValueError(f"kv_checksum must be on, decode or off, got "
                             f"{self.kv_checksum!r}")
        if not 0 <= self.chaos_corrupt_kv <= 1:
            raise ValueError(f"chaos_corrupt_kv must be a probability in [0, 1], got "
                             f"{self.chaos_corrupt_kv}")
        if not 0 < self.gil_switch_interval_s <= 1:
            raise ValueError(f"gil_switch_interval_s must be in (0, 1], got "
                             f"{self.gil_switch_interval_s}")
        if self.stream_interval < 1:
            raise ValueError(f"stream_interval must be >= 1, got {self.stream_interval}")
        if self.tp < 1:
            raise ValueError(f"tp must be >= 1, got {self.tp}")
        if self.shed_queued < 0:
            raise ValueError(f"shed_queued must be >= 0 (0 = off), got {self.shed_queued}")
        if self.role not in WORKER_ROLES:
            raise ValueError(f"role must be one of {', '.join(WORKER_ROLES)}, got {self.role!r}")
        if self.transfer_protocol not in ("tcp", "rdma"):
            raise ValueError(f"transfer_protocol must be tcp or rdma, got {self.transfer_protocol!r}")
        if self.kv_transfer_mode not in ("auto", "direct", "staged"):
            raise ValueError(f"kv_transfer_mode must be auto, direct or staged, "
                             f"got {self.kv_transfer_mode!r}")
        if self.kv_path not in ("auto", "mooncake", "shm", "ipc"):
            raise ValueError(f"kv_path must be auto, mooncake, shm or ipc, got {self.kv_path!r}")
        for name in ("bootstrap_timeout", "waiting_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 <= self.registry_wait_s < float("inf"):
            raise ValueError(f"registry_wait_s must be >= 0 seconds, got {self.registry_wait_s}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in 0..65535, got {self.port}")

    @property
    def advertise_host(self) -> str:
        """The host peers use: `hostname`, else `host` (loopback when bound to all interfaces)."""
        if self.hostname:
            return self.hostname
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def replace(self, **changes: Any) -> "WorkerConfig":
        return dataclasses.replace(self, **changes)


WORKER_ROLES = ("prefill", "decode", "colocated")

_WORKER_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "PDMESH_REGISTRY": ("registry", str),
    "PDMESH_HOSTNAME": ("hostname", str),
    "PDMESH_TRANSFER_PROTOCOL": ("transfer_protocol", str),
    "PDMESH_TRANSFER_DEVICE": ("transfer_device", str),
    "PDMESH_KV_TRANSFER_MODE": ("kv_transfer_mode", str),
    "PDMESH_KV_PATH": ("kv_path", str),
    "PDMESH_BOOTSTRAP_TIMEOUT": ("bootstrap_timeout", float),
    "PDMESH_WAITING_TIMEOUT": ("waiting_timeout", float),
    "PDMESH_REGISTRY_WAIT": ("registry_wait_s", float),
    "PDMESH_STREAM_INTERVAL": ("stream_interval", int),
    "PDMESH_GIL_SWITCH_INTERVAL": ("gil_switch_interval_s", float),
    "PDMESH_KV_CHECKSUM": ("kv_checksum", str),
    "PDMESH_SHED_QUEUED": ("shed_queued", int),
    "PDMESH_CHAOS_CORRUPT_KV": ("chaos_corrupt_kv", float),
    "PDMESH_CHAOS_CORRUPT_KV_REWRITES": ("chaos_corrupt_kv_rewrites", _env_bool),
    "PDMESH_CHAOS": ("chaos", _env_bool),
    "PDMESH_ENGINE_PROCESS": ("engine_process", _env_bool),
    "PDMESH_TP": ("tp", int),
}


def worker_config_from_env(base: WorkerConfig | None = None,
                           env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Apply PDMESH_REGISTRY / _HOSTNAME / _TRANSFER_PROTOCOL / _TRANSFER_DEVICE /
    _BOOTSTRAP_TIMEOUT / _WAITING_TIMEOUT on top of `base`."""
    return _apply_env(base or WorkerConfig(), _WORKER_ENV_OVERRIDES, env)


@dataclass(frozen=True)
class TelemetryConfig:
    """Traces and metrics of one service process (every service takes the same flags).

    Traces are exported by OTLP when `otlp_endpoint` is set, to a JSON-lines file when
    `trace_file` is set (both may be), and are off otherwise: then no span processor,
    no gRPC interceptor and no exporter exist, so the hot path pays nothing.
    """

    otlp_endpoint: str | None = None  # e.g. http://collector:4317 (grpc) or :4318 (http)
    otlp_protocol: str = "grpc"  # grpc | http/protobuf
    trace_file: str | None = None  # JSON lines, one span per line (appended)
    trace_sample_ratio: float = 1.0  # of new traces (roots); children follow their parent
    metrics_port: int = 0  # Prometheus /metrics (workers, registry); 0 = free, -1 = off
    log_interval_s: float = 10.0  # workers' periodic summary line; 0 = off

    def __post_init__(self) -> None:
        if self.otlp_protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"otlp_protocol must be grpc or http/protobuf, got {self.otlp_protocol!r}")
        if not 0.0 <= self.trace_sample_ratio <= 1.0:
            raise ValueError(f"trace_sample_ratio must be in [0, 1], got {self.trace_sample_ratio}")
        if not -1 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be in -1..65535, got {self.metrics_port}")
        if self.log_interval_s < 0:
            raise ValueError(f"log_interval_s must be >= 0, got {self.log_interval_s}")

    @property
    def tracing(self) -> bool:
        """True when spans go anywhere."""
        return bool(self.otlp_endpoint or self.trace_file)

    def replace(self, **changes: Any) -> "TelemetryConfig":
        return dataclasses.replace(self, **changes)


# OpenTelemetry's own variables first, so a standard collector set-up just works.
_TELEMETRY_ENV_OVERRIDES: dict[str, tuple[str, type]] = {
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("otlp_endpoint", str),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": ("otlp_endpoint", str),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("otlp_protocol", str),
    "PDMESH_TRACE_FILE": ("trace_file", str),
    "PDMESH_TRACE_SAMPLE_RATIO": ("trace_sample_ratio", float),
    "PDMESH_METRICS_PORT": ("metrics_port", int),
    "PDMESH_LOG_INTERVAL": ("log_interval_s", float),
}


def telemetry_config_from_env(base: TelemetryConfig | None = None,
                              env: Mapping[str, str] | None = None) -> TelemetryConfig:
    """Apply OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT / _PROTOCOL and PDMESH_TRACE_FILE /
    _TRACE_SAMPLE_RATIO / _METRICS_PORT / _LOG_INTERVAL on top of `base`."""
    return _apply_env(base or TelemetryConfig(), _TELEMETRY_ENV_OVERRIDES, env)


def cache_dir(env: Mapping[str, str] | None = None) -> "os.PathLike[str]":
    """Where pdmesh keeps derived files (converted tokenizers, dequantised GGUF weights,
    kernel tuning): PDMESH_CACHE_DIR, else
    $XDG_CACHE_HOME/pdmesh, else ~/.cache/pdmesh."""
    from pathlib import Path

    env = os.environ if env is None else env
    if env.get("PDMESH_CACHE_DIR"):
        return Path(env["PDMESH_CACHE_DIR"])
    return Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pdmesh"


def weights_cache_enabled(env: Mapping[str, str] | None = None) -> bool:
    """PDMESH_WEIGHTS_CACHE (default on): keep a GGUF's dequantised weights in
    cache_dir()/weights so later loads skip the parse (pdmesh.runtime.weights_cache)."""
    env = os.environ if env is None else env
    return _env_bool(env.get("PDMESH_WEIGHTS_CACHE") or "1")


__all__ = ["AuthConfig", "auth_config_from_env",
           "GatewayConfig", "gateway_config_from_env", "ROUTING_MODES", "ROUTING_POLICIES",
           "check_routing_policy", "ModelConfig", "RopeScaling", "EngineConfig", "engine_config_from_env",
           "SUPPORTED_ARCHS", "RegistryConfig", "registry_config_from_env",
           "WorkerConfig", "worker_config_from_env", "WORKER_ROLES",
           "TelemetryConfig", "telemetry_config_from_env"]
