"""Tensor parallelism in the runtime (pdmesh/runtime/tp): the sharding plan, each rank's
shards, and greedy generation over real rank processes (torch.distributed, gloo).

Greedy tokens at TP N must equal TP 1 (the same code in-process), pdmesh's Engine on the
same weights (float32), and for the tiny model transformers' own greedy loop.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pdmesh import Engine, SamplingParams
from pdmesh.runtime.loader import LoadedModel, read_hf_config, read_safetensors
from pdmesh.runtime.tp.driver import Step
from pdmesh.runtime.tp.launch import generate
from pdmesh.runtime.tp.lead import engine_generate
from pdmesh.runtime.tp.plan import TPPlan, check_tp
from pdmesh.runtime.tp.shard import read_safetensors_shard, shard_weights
from tiny_models import write_tiny_hf_model

N_TOKENS = 8
# mixed lengths: a 2-token prompt, one inside a page, one over two 16-token pages
TINY_PROMPTS = [[1, 2], [1, 5, 9, 200, 3000, 7], [1, *range(40, 77)]]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers' forward + cache."""
    out, past, x = [], None, torch.tensor([ids])
    with torch.inference_mode():
        for _ in range(n):
            res = model(x, past_key_values=past, use_cache=True)
            past, tok = res.past_key_values, int(res.logits[0, -1].argmax())
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def tiny_loaded(folder, tokenizer) -> LoadedModel:
    """A tiny folder (written without a tokenizer) as a LoadedModel with `tokenizer`."""
    return LoadedModel(read_hf_config(folder), read_safetensors(folder), tokenizer, folder, "hf")


def engine_greedy(loaded, prompts: list[list[int]], n: int = N_TOKENS) -> list[list[int]]:
    """The runtime's own greedy tokens (Engine, float32, no TP)."""
    engine = Engine(loaded=loaded, dtype="float32", page_size=16, num_pages=64)
    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(prompt_token_ids=prompts, params=params)]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, default_model):
    """A tiny random Llama: 4 heads, 2 KV heads (folder, transformers model)."""
    folder = tmp_path_factory.mktemp("tiny_llama_tp")
    return folder, tiny_model(folder, "llama", default_model, seed=3)


def tiny_model(folder, arch: str, default_model, **overrides):
    """A tiny random model with SmolLM2's vocab, written without a tokenizer (building
    transformers' tokenizer from the GGUF costs seconds; tiny_loaded borrows ours)."""
    vocab = default_model.config.vocab_size
    return write_tiny_hf_model(folder, arch, vocab_size=vocab, with_tokenizer=False, **overrides)


def smollm2_cfg():
    from pdmesh.config import ModelConfig

    return ModelConfig(arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                       num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64)


@pytest.mark.parametrize("h,hkv,tp,replicas", [(4, 2, 2, 1), (4, 2, 4, 2), (4, 1, 2, 2),
                                               (9, 3, 3, 1), (8, 8, 4, 1)])
def test_plan_heads_and_kv_heads(h, hkv, tp, replicas):
    cfg = dataclasses.replace(smollm2_cfg(), num_heads=h, num_kv_heads=hkv)
    g = h // hkv
    held = [0] * hkv
    for r in range(tp):
        plan = TPPlan(cfg, tp, r)
        (q0, q1), (k0, k1) = plan.heads, plan.kv_heads
        assert q1 - q0 == h // tp and k1 - k0 == max(1, hkv // tp)
        # every query head's KV head (j // g, as transformers groups them) is held here
        assert all(k0 <= j // g < k1 for j in range(q0, q1))
        assert plan.kv_replicas == replicas
        for k in range(k0, k1):
            held[k] += 1
    assert held == [replicas] * hkv


def test_plan_rejects_uneven_sizes():
    cfg = smollm2_cfg()
    with pytest.raises(ValueError, match="9 attention heads"):
        check_tp(cfg, 2)
    with pytest.raises(ValueError, match="multiple"):  # 6 > 4 KV heads, not a multiple
        check_tp(dataclasses.replace(cfg, num_heads=12, num_kv_heads=4), 6)
    with pytest.raises(ValueError, match="intermediate_size 1000"):
        check_tp(dataclasses.replace(cfg, intermediate_size=1000), 3)
    with pytest.raises(ValueError, match="rank 3"):
        TPPlan(cfg, 3, 3)


def test_smollm2_tp3_shards(default_model):
    """Every rank holds a third of every sharded weight; the ranks' shards put back
    together are the full weights (q, o in head order; vocab rows; MLP features)."""
    p, cfg = "model.layers.7.", default_model.config
    # one layer, the embedding and the final norm (cutting all 30 layers thrice costs seconds)
    full = {n: t for n, t in default_model.weights.items()
            if n.startswith((p, "model.embed", "model.norm"))}
    shards = [shard_weights(full, TPPlan(cfg, 3, r)) for r in range(3)]
    want = {"self_attn.q_proj.weight": (192, 576), "self_attn.k_proj.weight": (64, 576),
            "self_attn.v_proj.weight": (64, 576), "self_attn.o_proj.weight": (576, 192),
            "mlp.gate_proj.weight": (512, 576), "mlp.up_proj.weight": (512, 576),
            "mlp.down_proj.weight": (576, 512), "input_layernorm.weight": (576,)}
    for s in shards:
        assert {n: tuple(s[p + n].shape) for n in want} == want
        assert s["model.embed_tokens.weight"].shape == (16384, 576)
        assert "lm_head.weight" not in s  # tied: the embedding shard is the head shard
        assert sum(t.numel() for t in s.values()) < 0.36 * sum(t.numel() for t in full.values())
    for name, dim in [("self_attn.q_proj.weight", 0), ("self_attn.k_proj.weight", 0),
                      ("self_attn.o_proj.weight", 1), ("mlp.down_proj.weight", 1)]:
        assert torch.equal(torch.cat([s[p + name] for s in shards], dim), full[p + name])
    emb = torch.cat([s["model.embed_tokens.weight"] for s in shards])
    assert torch.equal(emb, full["model.embed_tokens.weight"])


def test_safetensors_shard_reads_slices_equal_to_cut(tiny_llama):
    """A HF folder read rank by rank (slices only) equals cutting the full weights;
    at TP 4 over 2 KV heads ranks 0,1 and 2,3 hold the same KV head."""
    folder, _ = tiny_llama
    loaded = tiny_loaded(folder, None)
    k = "model.layers.1.self_attn.k_proj.weight"
    per_rank = []
    for r in range(4):
        plan = TPPlan(loaded.config, 4, r)
        got = read_safetensors_shard(folder, plan)
        cut = shard_weights(loaded.weights, plan)
        assert got.keys() == cut.keys()
        assert all(torch.equal(got[n], cut[n]) for n in got)
        per_rank.append(got[k])
    assert per_rank[0].shape == (16, 64)  # one KV head of head_dim 16
    assert torch.equal(per_rank[0], per_rank[1]) and torch.equal(per_rank[2], per_rank[3])
    assert torch.equal(torch.cat([per_rank[0], per_rank[2]]), loaded.weights[k])


def test_step_roundtrip():
    step = Step([5, 6, 7, 9], [0, 1, 2, 40], [3, 1], [3, 41], [[4], [0, 1, 2]], [False, True])
    assert Step.decode(2, step.encode()) == step


def test_tiny_llama_tp2_equals_tp1_engine_and_transformers(tiny_llama, default_model):
    folder, hf = tiny_llama
    tp2 = generate(str(folder), TINY_PROMPTS, N_TOKENS, tp=2)
    assert tp2 == generate(str(folder), TINY_PROMPTS, N_TOKENS, tp=1)
    assert tp2 == engine_greedy(tiny_loaded(folder, default_model.tokenizer), TINY_PROMPTS)
    assert tp2 == [hf_greedy(hf, p, N_TOKENS) for p in TINY_PROMPTS]
    assert len({tuple(t) for t in tp2}) == len(TINY_PROMPTS)  # not one constant output


@pytest.mark.parametrize("arch,hkv,tp", [("qwen2", 1, 2), ("qwen3", 2, 4)])
def test_gqa_tp_exceeds_kv_heads(tmp_path, default_model, arch, hkv, tp):
    """4 heads over fewer KV heads than ranks, so KV heads are replicated (vLLM's rule):
    Qwen2 (q/k/v biases, sharded with their rows) with 1 KV head at TP 2; Qwen3
    (per-head q/k RMSNorm, replicated) with 2 KV heads at TP 4."""
    hf = tiny_model(tmp_path, arch, default_model, seed=5, num_key_value_heads=hkv)
    out = generate(str(tmp_path), TINY_PROMPTS, N_TOKENS, tp=tp)
    assert out == engine_greedy(tiny_loaded(tmp_path, default_model.tokenizer), TINY_PROMPTS)
    assert out == [hf_greedy(hf, p, N_TOKENS) for p in TINY_PROMPTS]


def test_smollm2_tp3_equals_engine(default_model):
    tok = default_model.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}])
               for q in ("What is the capital of France?", "Write a haiku about the sea.")]
    tp3 = generate("default", prompts, N_TOKENS, tp=3)
    assert tp3 == engine_greedy(default_model, prompts)
    assert tok.decode(tp3[0]).startswith("The capital of France is Paris")


def test_stop_token_ends_a_sequence(tiny_llama):
    folder, _ = tiny_llama
    full = generate(str(folder), TINY_PROMPTS, N_TOKENS, tp=1)
    stop = full[1][2]
    out = generate(str(folder), TINY_PROMPTS, N_TOKENS, tp=1, stop_token_ids=(stop,))
    assert out[1] == full[1][: full[1].index(stop) + 1]
    assert all(o == f[: f.index(stop) + 1] if stop in f else o == f for o, f in zip(out, full))


def test_generate_refuses_uneven_tp_before_starting_ranks(tiny_llama):
    folder, _ = tiny_llama
    with pytest.raises(ValueError, match="4 attention heads"):
        generate(str(folder), TINY_PROMPTS, N_TOKENS, tp=3)


def test_a_failing_rank_fails_generate(tmp_path, default_model):
    """Weights missing a tensor: the ranks raise while loading, and generate raises
    with their traceback instead of hanging."""
    from safetensors.torch import load_file, save_file

    tiny_model(tmp_path, "llama", default_model)
    f = tmp_path / "model.safetensors"
    weights = load_file(f)
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, f)
    with pytest.raises(RuntimeError, match="shard lacks model.layers.1.mlp.up_proj.weight"):
        generate(str(tmp_path), TINY_PROMPTS, N_TOKENS, tp=2)


def test_tp1_forward_is_the_runtimes_bit_for_bit(tiny_llama):
    """TPCausalLM at TP 1 runs CausalLM.forward's ops in its order: equal hidden states
    (prefill of two sequences, then a decode step) and logits to float rounding."""
    from pdmesh.runtime.attention import AttnMetadata, SeqSpan
    from pdmesh.runtime.model import CausalLM
    from pdmesh.runtime.tp.comm import TPGroup
    from pdmesh.runtime.tp.model import TPCausalLM

    folder, _ = tiny_llama
    loaded = tiny_loaded(folder, None)
    ref = CausalLM(loaded.config)
    ref.load_hf_weights(loaded.weights)
    plan = TPPlan(loaded.config, 1, 0)
    tp = TPCausalLM.from_shards(plan, TPGroup(0, 1, torch.device("cpu")),
                                shard_weights(loaded.weights, plan))
    kv_ref, kv_tp = (torch.zeros(tp.kv_shape(8, 16)) for _ in range(2))
    a, b = TINY_PROMPTS[1], TINY_PROMPTS[2]
    pre = [SeqSpan(0, len(a), len(a), torch.tensor([0])),
           SeqSpan(len(a), len(b), len(b), torch.tensor([1, 2, 3]))]
    dec = [SeqSpan(0, 1, len(a) + 1, torch.tensor([0])),
           SeqSpan(1, 1, len(b) + 1, torch.tensor([1, 2, 3]))]
    for ids, pos, spans in [(a + b, [*range(len(a)), *range(len(b))], pre),
                            ([7, 8], [len(a), len(b)], dec)]:
        meta = AttnMetadata.build(spans, 16)
        args = torch.tensor(ids), torch.tensor(pos)
        h_ref, h_tp = ref(*args, kv_ref, meta), tp(*args, kv_tp, meta)
        assert torch.equal(h_ref, h_tp)
    assert torch.equal(kv_ref, kv_tp)
    torch.testing.assert_close(tp.logits(h_tp), ref.logits(h_ref))


def test_engine_steps_on_tp_ranks(tiny_llama, default_model):
    """An Engine on rank 0 whose forwards run on 2 ranks (lead.py): scheduler batches,
    16-token prefill chunks that sample nothing, and a second round that reuses the
    first round's cached prefix on both ranks; tokens equal the Engine alone."""
    folder, _ = tiny_llama
    if not (folder / "tokenizer.json").is_file():
        default_model.tokenizer.hf.save_pretrained(folder)  # the Engine loads one
    rounds = [[TINY_PROMPTS[2], TINY_PROMPTS[1]], [TINY_PROMPTS[2][:33] + [9, 10, 11]]]
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True)
    kw = dict(page_size=16, num_pages=64, chunked_prefill_size=16)
    outs = engine_generate(str(folder), rounds, params, tp=2, **kw)
    alone = Engine(model=str(folder), dtype="float32", **kw)
    for prompts, got in zip(rounds, outs):
        want = alone.generate(prompt_token_ids=prompts, params=params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert outs[1][0].cached_tokens == 32  # two full pages of the first round's prompt
