"""Tiny random-weight models for tests: HF folders via transformers, GGUF files via gguf-py.

Usage from any test (pytest puts tests/ on sys.path):
    from tiny_models import write_tiny_hf_model, write_tiny_gguf
"""
from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, MODEL_ARCH
from gguf import get_tensor_name_map
from gguf.quants import quantize

from pdmesh.runtime.loader import resolve_model_path

ARCHS = ("llama", "qwen2", "qwen3")
TINY_DEFAULTS: dict[str, Any] = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)
# qwen3 decouples head_dim from hidden/heads (Qwen3-0.6B: 1024 / 16 heads, head_dim 128)
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {"llama": {}, "qwen2": {}, "qwen3": {"head_dim": 32}}
_GGUF_ARCH = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2, "qwen3": MODEL_ARCH.QWEN3}


@functools.lru_cache(maxsize=1)
def smollm2_tokenizer():
    """The default model's transformers tokenizer, built once per process from its GGUF."""
    from transformers import AutoTokenizer

    path = resolve_model_path("default")
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def tiny_hf_config(arch: str, **overrides: Any):
    """A transformers config for a tiny `arch` model (vocab = SmolLM2's unless overridden).

    llama3 rope scaling: rope_parameters={"rope_type": "llama3", "factor": 8.0,
    "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
    "rope_theta": 500000.0}.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kwargs = {**TINY_DEFAULTS, **ARCH_DEFAULTS[arch], **overrides}
    kwargs.setdefault("vocab_size", len(smollm2_tokenizer()))
    return cls(**kwargs)


def write_tiny_hf_model(folder: Path, arch: str, seed: int = 0, *, with_tokenizer: bool = True,
                        **overrides: Any):
    """Write a tiny random `arch` model (llama, qwen2, qwen3) as a HF folder; return the model.

    Norm weights and biases are randomised too, so name mix-ups can't hide behind ones/zeros.
    `overrides` go to the transformers config (e.g. tie_word_embeddings=True, vocab_size=256,
    rope_parameters=... for llama3 scaling). The SmolLM2 tokenizer is saved alongside.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    folder = Path(folder)
    model.save_pretrained(folder)
    if with_tokenizer:
        smollm2_tokenizer().save_pretrained(folder)
    return model


CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_chatml_tokenizer() -> dict[str, Any]:
    """Minimal GGUF tokenizer metadata: byte-level BPE over the 256 byte tokens plus "hi"
    (one merge, id 256), control tokens <|im_start|> (257, bos), <|im_end|> (258, eos) and
    <|endoftext|> (259), and a ChatML template. Use with vocab_size=260."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # transformers' GPT2Tokenizer appends <|endoftext|> if the vocab lacks it
    tokens = [*bytes_to_unicode().values(), "hi", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 257 + [3, 3, 3],  # 1 normal, 3 control
        "tokenizer.ggml.merges": ["h i"],
        "tokenizer.ggml.bos_token_id": 257,
        "tokenizer.ggml.eos_token_id": 258,
        "tokenizer.chat_template": CHATML_TEMPLATE,
    }


def llamacpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation for arch llama (convert_hf_to_gguf.py LlamaModel.permute)."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                        original: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for llama3 scaling (LlamaModel.generate_extra_tensors)."""
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_tiny_gguf(path: Path, model, qtype: GGMLQuantizationType = GGMLQuantizationType.F32, *,
                    tokenizer: dict[str, Any] | None = None,
                    extra_tensors: dict[str, np.ndarray] | None = None,
                    arch: str | None = None) -> dict[str, np.ndarray]:
    """Write a transformers `model` as llama.cpp's converter would; return {gguf name: data written}.

    Matrices are stored as `qtype`, 1-D tensors as F32. `tokenizer`: GGUF tokenizer metadata
    (e.g. tiny_chatml_tokenizer()); without it the file has none and no tokenizer can be
    built from it. `extra_tensors` add or replace tensors by GGUF name; `arch` overrides
    general.architecture.
    """
    cfg = model.config
    writer = GGUFWriter(str(path), arch or cfg.model_type)
    _write_metadata(writer, cfg, with_special_ids=tokenizer is None)
    for key, value in (tokenizer or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        else:
            writer.add_array(key, value)
    tensors = _gguf_tensors(model, qtype)
    tensors.update(extra_tensors or {})
    for name, data in tensors.items():
        raw = qtype if data.dtype == np.uint8 else None  # uint8 = quantised bytes
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def _write_metadata(writer: GGUFWriter, cfg, with_special_ids: bool) -> None:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_vocab_size(cfg.vocab_size)
    if with_special_ids and cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if with_special_ids and cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)


def gguf_tensor_name(config, hf_name: str) -> str:
    """llama.cpp's name for a HF tensor name (from gguf-py's own tables)."""
    names = get_tensor_name_map(_GGUF_ARCH[config.model_type], config.num_hidden_layers)
    return names.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _gguf_tensors(model, qtype: GGMLQuantizationType) -> dict[str, np.ndarray]:
    cfg = model.config
    out: dict[str, np.ndarray] = {}
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = t.detach().float().numpy()
        if cfg.model_type == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            w = llamacpp_permute(w, cfg.num_attention_heads)
        elif cfg.model_type == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            w = llamacpp_permute(w, cfg.num_key_value_heads)
        out[gguf_tensor_name(cfg, hf_name)] = quantize(w, qtype) if w.ndim == 2 else w.astype(np.float32)
    return out
