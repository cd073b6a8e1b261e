"""Write a random-weight HF model folder of a real model's shape, with the default model's
tokenizer, for serving benchmarks where the default model (135M) is too cheap to show
what a larger model pays (prefill cost, KV bytes per token).

    python3 benchmarks/random_hf_model.py /tmp/llama-1b --shape llama-1b
    pdmesh serve --model /tmp/llama-1b ...

Shapes (vocabulary: SmolLM2's 49,152, so that its tokenizer and chat template serve):
  llama-1b   Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, head dim 64,
             MLP 8192, tied embeddings (1.1 B parameters; KV 32 KiB per token in bf16)
  llama-8b   Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128,
             MLP 14336 (7.0 B parameters; KV 128 KiB per token)
  tiny       2 layers, hidden 64 (for a quick check)
Weights ~ N(0, 0.02), norms 1, in bf16 (safetensors), made on the GPU when there is one.
The text it generates is noise; benchmarks run it with ignore_eos and fixed lengths.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

SHAPES = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}


def config(shape: str, vocab: int, bos: int, eos: int) -> dict:
    """A transformers LlamaConfig dict of that shape."""
    return dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab,
                rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
                hidden_act="silu", torch_dtype="bfloat16", bos_token_id=bos,
                eos_token_id=eos, **SHAPES[shape])


def tensors(c: dict, device: str, seed: int) -> dict[str, torch.Tensor]:
    """HF-named random weights (bf16, on the CPU when written)."""
    g = torch.Generator(device=device).manual_seed(seed)
    h, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    d = h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * d

    def rnd(*shape: int) -> torch.Tensor:
        t = torch.empty(shape, dtype=torch.bfloat16, device=device)
        return t.normal_(0.0, 0.02, generator=g).cpu()

    out = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    if not c["tie_word_embeddings"]:
        out["lm_head.weight"] = rnd(v, h)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out |= {p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                p + "mlp.down_proj.weight": rnd(h, f),
                p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-1b")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from pdmesh.runtime.loader import resolve_model_path
    from pdmesh.runtime.tokenizer import Tokenizer

    t0, folder = time.perf_counter(), Path(a.folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_path(resolve_model_path("default"))
    tok.hf.save_pretrained(folder)
    c = config(a.shape, len(tok.hf), tok.hf.bos_token_id or 1, tok.hf.eos_token_id or 2)
    (folder / "config.json").write_text(json.dumps(c, indent=1))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = tensors(c, device, a.seed)
    save_file(w, str(folder / "model.safetensors"), metadata={"format": "pt"})
    n = sum(t.numel() for t in w.values())
    print(f"{folder}: {a.shape}, {n / 1e9:.2f} B parameters, "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
