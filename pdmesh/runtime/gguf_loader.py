"""GGUF checkpoints (llama.cpp format) -> `ModelConfig` and Hugging Face-named float32 weights.

Tensors are dequantised with `gguf.quants.dequantize`, so every type gguf-py can
dequantise is accepted (F32, F16, BF16, Q8_0, Q4_0, Q4_1, the K-quants, ...).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

from pdmesh.config import ModelConfig, RopeScaling
from pdmesh.runtime import gguf_readers

GGUF_ARCHS = ("llama", "qwen2", "qwen3")
# weights_cache.FORMAT_VERSION: bump it when read_gguf's output changes for the same file

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp stores llama3 rope scaling as per-frequency factors, not as metadata.
_ROPE_FREQS = "rope_freqs.weight"
_REQUIRED = object()


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a GGUF file into (config, HF-named float32 weights); ValueError names what is wrong."""
    reader = open_gguf(path)
    tensors = {t.name: t for t in reader.tensors}
    config = gguf_config(reader, tensors, path)
    weights: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        name = hf_tensor_name(t.name)
        if name is None:
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture {config.arch!r}")
        try:
            w = dequantize_tensor(t)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from e
        if config.arch == "llama" and name.split(".")[-2] in ("q_proj", "k_proj"):
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
            w = unpermute_qk(w, heads)
        weights[name] = torch.from_numpy(w)
    return config, weights


def open_gguf(path: Path) -> GGUFReader:
    """Open a GGUF file, turning the reader's assorted parse errors into a ValueError
    (within `gguf_readers.one_parse()`, a file already parsed is not parsed again)."""
    try:
        return gguf_readers.open_reader(path)
    except Exception as e:  # truncated files raise IndexError, ValueError, struct errors...
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None


def dequantize_tensor(t: ReaderTensor) -> np.ndarray:
    """Dequantise to a writable float32 array in HF layout ([out, in] for matrices)."""
    try:
        w = dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise ValueError(f"tensor {t.name!r}: cannot dequantise type {t.tensor_type.name} ({e})") from e
    # GGUF lists dims fastest-first (ne0 = in_features); numpy wants them slowest-first.
    shape = tuple(int(n) for n in reversed(t.shape))
    w = w.reshape(shape)
    if w.dtype != np.float32 or not w.flags.writeable or not w.flags.c_contiguous:
        w = np.array(w, dtype=np.float32, order="C")  # F32 data is a read-only view of the mmap
    return w


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for arch `llama` (weights [H*Dh, in] or biases [H*Dh]).

    llama.cpp reorders each head's rows from HF's rotate-half layout (first half, second
    half) to interleaved pairs: row (h, i, j) of the GGUF tensor with shape [H, Dh/2, 2]
    is HF row (h, j, i) of shape [H, 2, Dh/2].
    """
    half = w.shape[0] // n_heads // 2
    return np.ascontiguousarray(
        w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def gguf_config(reader: GGUFReader, tensors: dict[str, ReaderTensor], path: Path) -> ModelConfig:
    """Build a ModelConfig from GGUF metadata (and tensor presence for bias/tying)."""
    arch = _field(reader, "general.architecture", path=path)
    if arch not in GGUF_ARCHS:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} "
                         f"(supported: {', '.join(GGUF_ARCHS)})")

    def key(name: str, default: Any = _REQUIRED) -> Any:
        return _field(reader, f"{arch}.{name}", default, path)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", None) or key("rope.dimension_count", None)
                   or hidden // heads)
    theta = float(key("rope.freq_base", 10000.0))
    return ModelConfig(
        arch=arch,
        vocab_size=_vocab_size(reader, arch, tensors),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=int(key("block_count")),
        num_heads=heads,
        num_kv_heads=_kv_heads(key("attention.head_count_kv", heads), path),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=theta,
        rope_scaling=_rope_scaling(reader, arch, tensors, head_dim, theta, path),
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        bos_token_id=_token_id(reader, "bos"),
        # llama.cpp stops on any end-of-generation id: eos, end-of-turn, end-of-message
        eos_token_ids=tuple(dict.fromkeys(
            i for k in ("eos", "eot", "eom") if (i := _token_id(reader, k)) is not None)),
    )


def _field(reader: GGUFReader, key: str, default: Any = _REQUIRED, path: Path | None = None) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"{path or 'GGUF file'}: metadata lacks {key!r}")
        return default
    return field.contents()


def _token_id(reader: GGUFReader, kind: str) -> int | None:
    value = _field(reader, f"tokenizer.ggml.{kind}_token_id", None)
    return None if value is None else int(value)


def _vocab_size(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor]) -> int:
    if (n := _field(reader, f"{arch}.vocab_size", None)) is not None:
        return int(n)
    if (tokens := reader.get_field("tokenizer.ggml.tokens")) is not None:
        return len(tokens.data)
    return int(tensors["token_embd.weight"].shape[1])  # ne = [hidden, vocab]


def _kv_heads(value: Any, path: Path) -> int:
    if isinstance(value, list):  # some files store one count per layer
        if len(set(value)) != 1:
            raise ValueError(f"{path}: per-layer kv head counts {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def _rope_scaling(reader: GGUFReader, arch: str, tensors: dict[str, ReaderTensor],
                  head_dim: int, theta: float, path: Path) -> RopeScaling | None:
    kind = _field(reader, f"{arch}.rope.scaling.type", "none")
    factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
    if kind not in ("none", "linear") or (kind == "linear" and factor != 1.0):
        raise ValueError(f"{path}: unsupported rope scaling {kind!r} (factor {factor}); "
                         "only llama3 (rope_freqs) is supported")
    if _ROPE_FREQS not in tensors:
        return None
    factors = dequantize_tensor(tensors[_ROPE_FREQS]).astype(np.float64)
    orig = int(_field(reader, f"{arch}.rope.scaling.original_context_length", 8192))
    return llama3_scaling_from_factors(factors, head_dim, theta, orig, path)


def llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, theta: float,
                                original_max_positions: int, path: Path) -> RopeScaling | None:
    """Recover llama3 rope parameters from llama.cpp's `rope_freqs` (inv_freq divisors, [Dh/2]).

    The file keeps only the resulting per-frequency factors; every released Llama 3.x uses
    low/high freq factors 1 and 4, so we assume those and check they reproduce the tensor.
    """
    from pdmesh.runtime.model import rope_inv_freq  # lazy: model pulls in attention kernels

    factor = float(factors.max())
    if factor <= 1.0:
        return None
    scaling = RopeScaling(factor=factor, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=original_max_positions)
    expected = (rope_inv_freq(head_dim, theta, None) / rope_inv_freq(head_dim, theta, scaling)).numpy()
    if expected.shape != factors.shape or not np.allclose(expected, factors, rtol=1e-3):
        raise ValueError(f"{path}: rope_freqs tensor does not match llama3 scaling "
                         f"(factor {factor}, low 1, high 4, original {original_max_positions})")
    return scaling
