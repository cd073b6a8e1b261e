"""`pdmesh bench-runtime`: decode step time and prefill throughput, pdmesh vs transformers.

Both run in this one process on the same weights and threads, interleaved per figure,
so machine noise hits both alike. Prompts are random token ids (seeded); decode runs
with ignore_eos so every request decodes the full count.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=128, help="prompt tokens before decoding")
    p.add_argument("--decode-steps", type=int, default=16, help="timed decode steps per figure")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers column")
    p.add_argument("--json", default=None, help="also write the figures to this file")


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n, length), generator=g).tolist()


def pdmesh_decode_step(engine, batch: int, context: int, steps: int) -> float:
    """Seconds per decode step with `batch` requests at about `context` tokens each."""
    from pdmesh.runtime.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=steps + 4, temperature=0, ignore_eos=True)
    ids = [engine.add_request(prompt_token_ids=p, params=params)
           for p in _prompts(batch, context, engine.model_config.vocab_size, batch)]
    while engine.scheduler.prefilling or engine.scheduler.waiting:
        engine.step()
    engine.step()  # one untimed decode step (warm-up)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    dt = (time.perf_counter() - t0) / steps
    for rid in ids:
        engine.abort(rid)
    return dt


def pdmesh_prefill(engine, tokens: int) -> float:
    """Seconds to prefill one `tokens`-long prompt (one step; chunk size permitting)."""
    from pdmesh.runtime.sampling_params import SamplingParams

    prompt = _prompts(1, tokens, engine.model_config.vocab_size, 7)[0]
    rid = engine.add_request(prompt_token_ids=prompt, params=SamplingParams(max_tokens=1))
    t0 = time.perf_counter()
    while engine.scheduler.prefilling or engine.scheduler.waiting:
        engine.step()
    dt = time.perf_counter() - t0
    engine.abort(rid)
    return dt


def hf_decode_step(hf, batch: int, context: int, steps: int, vocab: int) -> float:
    """Seconds per token step of transformers' generate: (t(steps+1) - t(1)) / steps."""
    import torch

    ids = torch.tensor(_prompts(batch, context, vocab, batch))
    kw = dict(do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)

    def timed(n: int) -> float:
        t0 = time.perf_counter()
        hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0

    timed(2)  # warm-up
    return (timed(steps + 1) - timed(1)) / steps


def hf_prefill(hf, tokens: int, vocab: int) -> float:
    import torch

    ids = torch.tensor(_prompts(1, tokens, vocab, 7))
    with torch.inference_mode():
        t0 = time.perf_counter()
        hf(ids, use_cache=True)
        return time.perf_counter() - t0


def _median(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def _load_hf(model: str):
    import torch
    from transformers import AutoModelForCausalLM

    from pdmesh.runtime.loader import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                dtype=torch.float32).eval()


def measure(args: argparse.Namespace) -> list[dict]:
    import torch

    from pdmesh.runtime.engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    need = max(args.batch_sizes) * (args.context + args.decode_steps + 8) + args.prefill_tokens
    engine = Engine(model=args.model, num_pages=need // 16 + 64,
                    max_running_requests=max(args.batch_sizes),
                    max_prefill_tokens=max(4096, args.prefill_tokens),
                    chunked_prefill_size=max(2048, args.prefill_tokens))
    hf = None if args.no_transformers else _load_hf(args.model)
    vocab, rows = engine.model_config.vocab_size, []
    for b in args.batch_sizes:
        ours = _median(lambda: pdmesh_decode_step(engine, b, args.context, args.decode_steps),
                       args.repeats)
        ref = None if hf is None else _median(
            lambda: hf_decode_step(hf, b, args.context, args.decode_steps, vocab), args.repeats)
        rows.append({"figure": f"decode step, batch {b}", "unit": "ms", "batch": b,
                     "pdmesh": ours * 1e3, "transformers": ref and ref * 1e3})
    n = args.prefill_tokens
    ours = _median(lambda: pdmesh_prefill(engine, n), args.repeats)
    ref = None if hf is None else _median(lambda: hf_prefill(hf, n, vocab), args.repeats)
    rows.append({"figure": f"prefill {n} tokens", "unit": "tok/s", "pdmesh": n / ours,
                 "transformers": ref and n / ref})
    return rows


def render(rows: list[dict], threads: int) -> str:
    out = [f"torch threads: {threads}", "",
           "| figure | pdmesh | transformers | pdmesh / transformers |", "|---|---|---|---|"]
    for r in rows:
        ref = r["transformers"]
        ratio = "" if ref is None else (f"{ref / r['pdmesh']:.2f}x faster" if r["unit"] == "ms"
                                        else f"{r['pdmesh'] / ref:.2f}x faster")
        out.append(f"| {r['figure']} | {r['pdmesh']:.1f} {r['unit']} | "
                   f"{'' if ref is None else f'{ref:.1f} ' + r['unit']} | {ratio} |")
    dec = {r["batch"]: r for r in rows if "batch" in r}
    if 1 in dec and dec[1]["transformers"]:
        hf_tok_s = 1e3 / dec[1]["transformers"]
        out.append("")
        out.append(f"transformers batch 1: {hf_tok_s:.1f} output tok/s")
        for b, r in sorted(dec.items()):
            tok_s = b * 1e3 / r["pdmesh"]
            out.append(f"pdmesh batch {b}: {tok_s:.1f} output tok/s "
                       f"= {tok_s / hf_tok_s:.2f}x transformers batch 1")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    import torch

    rows = measure(args)
    print(render(rows, torch.get_num_threads()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
