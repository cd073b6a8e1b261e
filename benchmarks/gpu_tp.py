"""Tensor parallelism on GPUs: TP 1 vs TP 2 (or any sizes) side by side, each beside its floor.

    python3 benchmarks/gpu_tp.py                        # Llama-3-8B shape, TP 1 and 2
    python3 benchmarks/gpu_tp.py --tp 1 2 --batches 1 16 64 --contexts 512 4096 --out t.md

Each TP size is one group of rank processes (rank r on cuda:r, NCCL), running pdmesh's TP
runtime as a worker does (pdmesh/runtime/tp: rank 0 broadcasts each step, every rank
forwards its shard; decode steps replay CUDA graphs with the all-reduces inside unless
--no-graphs). Weights are random bf16 of the Llama-3-8B shape, made on each rank's GPU
(no checkpoint is read). Printed per TP size:

  decode ms/step at batch B, context C  (rank 0's wall time per step: the step broadcast,
      the forward, the logits all-gather and the sampler's argmax + .tolist())
  prefill tok/s of one C-token prompt
  floor: decode = (weight bytes + KV bytes read) per GPU / the measured copy bandwidth
         + all-reduce bytes per GPU / the measured NCCL bus bandwidth;
         prefill = FLOPs per GPU / the measured bf16 matmul rate + all-reduce bytes / bus bw
The ceilings are measured in the same run on each rank's GPU (a 4 GiB device copy, 8192^3
bf16 matmuls, a 256 MiB all-reduce); the all-reduce latency at the decode's message size is
printed too (small all-reduces are latency-bound, not bandwidth-bound).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_runtime import LLAMA8B, ceilings, gpu_time, matmul_params  # noqa: E402

from pdmesh.config import ModelConfig  # noqa: E402

from pdmesh.rope import rope_inv_freq  # noqa: E402
from pdmesh.runtime.tp.comm import TPGroup, host_store  # noqa: E402
from pdmesh.runtime.tp.driver import Step, TPRunner  # noqa: E402
from pdmesh.runtime.tp.model import TPCausalLM  # noqa: E402
from pdmesh.runtime.tp.plan import TPPlan  # noqa: E402

PAGE = 16
TINY = ModelConfig(arch="llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                   rope_theta=10000.0, max_position_embeddings=4096)  # --device cpu smoke run
SHAPES = {"llama8b": LLAMA8B, "tiny": TINY}


def random_model(cfg, group: TPGroup) -> TPCausalLM:
    """This rank's shard with N(0, 0.02) bf16 weights made on its GPU (norms 1)."""
    plan = TPPlan(cfg, group.size, group.rank)
    with torch.device("meta"):
        model = TPCausalLM(plan, group).to(torch.bfloat16)
    model.to_empty(device=group.device)
    model._inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    gen = torch.Generator(group.device).manual_seed(group.rank)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen) if p.dim() > 1 else p.fill_(1.0)
    return model.eval()


def weight_bytes(model: TPCausalLM) -> int:
    """Bytes a decode step reads on this rank: every parameter but the embedding table."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n != "embed_tokens.weight")


def decode_step(b: int, ctx: int, vocab: int, pages_per_seq: int) -> Step:
    """b sequences of ctx tokens, sequence i in pages [i * per, (i + 1) * per)."""
    ids = torch.randint(0, vocab, (b,)).tolist()
    used = -(-ctx // PAGE)
    pages = [list(range(i * pages_per_seq, i * pages_per_seq + used)) for i in range(b)]
    return Step(ids, [ctx - 1] * b, [1] * b, [ctx] * b, pages, [True] * b)


def timed(runner: TPRunner, step: Step, n: int, warmup: int = 3) -> float:
    """Median wall seconds of send + forward + argmax().tolist() on rank 0."""
    times = []
    for i in range(warmup + n):
        t0 = time.perf_counter()
        runner.send(step)
        runner.forward(step).argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def dev_time(fn, n: int, dev: torch.device) -> float:
    """Median seconds of fn(): CUDA events on a GPU, the wall clock on CPU."""
    if dev.type == "cuda":
        return gpu_time(fn, n)
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bus_bandwidth(group: TPGroup, nbytes: int) -> float:
    """All-reduce bus bandwidth (bytes/s): 2 (n - 1) / n x bytes / time."""
    if group.size == 1:
        return float("inf")
    t = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=group.device)
    sec = dev_time(lambda: dist.all_reduce(t), 10, group.device)
    return 2 * (group.size - 1) / group.size * nbytes / sec


def allreduce_latency(group: TPGroup, nbytes: int) -> float:
    if group.size == 1:
        return 0.0
    t = torch.ones(max(1, nbytes // 2), dtype=torch.bfloat16, device=group.device)
    return dev_time(lambda: dist.all_reduce(t), 50, group.device)


def cpu_ceilings() -> tuple[float, float]:
    """(memcpy bytes/s over 256 MiB, bf16 matmul FLOP/s at 1024^3) on this CPU."""
    a = torch.ones(1 << 27, dtype=torch.int16)
    b = torch.empty_like(a)
    bw = 2 * a.numel() * 2 / dev_time(lambda: b.copy_(a), 5, a.device)
    x = torch.randn(1024, 1024, dtype=torch.bfloat16)
    return bw, 2 * 1024 ** 3 / dev_time(lambda: x @ x, 5, x.device)


def rank_main(rank: int, size: int, port: int, args, results) -> None:
    group = TPGroup.join(rank, size, port, args.device)
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    try:
        cfg = SHAPES[args.shape]
        # every rank measures its own GPU
        bw, rate = ceilings(group.device) if group.device.type == "cuda" else cpu_ceilings()
        busbw = bus_bandwidth(group, (256 if group.device.type == "cuda" else 16) << 20)
        lat = {b: allreduce_latency(group, b * cfg.hidden_size * 2) for b in args.batches}
        model = random_model(cfg, group)
        b_max, c_max = max(args.batches), max(args.contexts + [args.prefill])
        per = -(-(max(args.contexts) + 8) // PAGE)
        num_pages = max(b_max * per, -(-c_max // PAGE)) + 8
        runner = TPRunner(model, num_pages, PAGE)
        if not args.no_graphs and group.device.type == "cuda":
            runner.capture_graphs(sorted(set(args.batches)), max(args.contexts))
        if rank != 0:
            runner.follow()
            return
        rows = {"tp": size, "copy_bw": bw, "matmul": rate, "busbw": busbw, "ar_lat": lat,
                "weights": weight_bytes(model), "kv_token": kv_token_bytes(runner),
                "decode": {}, "prefill": None, "mem_gb": 0.0}
        for b in args.batches:
            for c in args.contexts:
                st = decode_step(b, c, cfg.vocab_size, per)
                rows["decode"][(b, c)] = timed(runner, st, args.steps)
        t = args.prefill
        st = Step(torch.randint(0, cfg.vocab_size, (t,)).tolist(), list(range(t)), [t], [t],
                  [list(range(-(-t // PAGE)))], [True])
        rows["prefill"] = timed(runner, st, 5, warmup=2)
        if group.device.type == "cuda":
            rows["mem_gb"] = torch.cuda.max_memory_allocated(group.device) / 1e9
        runner.send(None)
        results.put(rows)
    finally:
        group.close()


def kv_token_bytes(runner: TPRunner) -> int:
    """KV bytes per token on this rank (its KV heads, every layer, K and V)."""
    kv = runner.kv  # [P, L, page, 2, hkv, Dh]
    return kv[0].numel() * kv.element_size() // kv.shape[2]


def run_tp(size: int, args) -> dict:
    ctx = torch.multiprocessing.get_context("spawn")
    store, results = host_store(size), ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, size, store.port, args, results))
             for r in range(size)]
    for p in procs:
        p.start()
    try:
        return results.get(timeout=args.timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()


def floors(r: dict, b: int, c: int, cfg: ModelConfig) -> float:
    """Decode floor seconds per step on one GPU (see module docstring)."""
    n = r["tp"]
    read = r["weights"] + b * c * r["kv_token"]
    ar = (2 * cfg.num_layers + 1) * b * cfg.hidden_size * 2 if n > 1 else 0
    return read / r["copy_bw"] + ar / r["busbw"]


def prefill_floor(r: dict, t: int, cfg: ModelConfig) -> float:
    n = r["tp"]
    flops = 2 * t * matmul_params(cfg) / n  # matmuls (the LM head: one row)
    flops += 2 * cfg.num_layers * cfg.num_heads / n * cfg.head_dim * t * t  # causal QK, PV
    ar = (2 * cfg.num_layers + 1) * t * cfg.hidden_size * 2 if n > 1 else 0
    return flops / r["matmul"] + ar / r["busbw"]


def report(results: list[dict], args) -> str:
    cfg = SHAPES[args.shape]
    where = (f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
             if args.device == "cuda" else "CPU (gloo)")
    out = [f"# TP on GPUs, {datetime.date.today()}, {where}, {args.shape} shape, random bf16, "
           f"page {PAGE}, CUDA graphs {'off' if args.no_graphs else 'on'}", ""]
    for r in results:
        out.append(f"- TP {r['tp']}: copy {r['copy_bw'] / 1e12:.2f} TB/s, matmul "
                   f"{r['matmul'] / 1e12:.0f} TFLOP/s, all-reduce bus {r['busbw'] / 1e9:.0f} GB/s, "
                   f"all-reduce latency " + ", ".join(
                       f"B={b} {v * 1e6:.0f} us" for b, v in r["ar_lat"].items())
                   + f"; weights per GPU {r['weights'] / 1e9:.2f} GB, peak memory "
                   f"{r['mem_gb']:.1f} GB")
    out += ["", "| batch | context | " + " | ".join(
        f"TP {r['tp']} ms/step | floor" for r in results) + " | TP speed-up |",
        "|---|---|" + "---|---|" * len(results) + "---|"]
    for b in args.batches:
        for c in args.contexts:
            cells = [f"{r['decode'][(b, c)] * 1e3:.2f} | {floors(r, b, c, cfg) * 1e3:.2f}"
                     for r in results]
            sp = results[0]["decode"][(b, c)] / results[-1]["decode"][(b, c)]
            out.append(f"| {b} | {c} | " + " | ".join(cells) + f" | {sp:.2f}x |")
    t = args.prefill
    out += ["", f"| prefill {t} tokens | " + " | ".join(f"TP {r['tp']}" for r in results)
            + " |", "|---|" + "---|" * len(results),
            "| tok/s | " + " | ".join(f"{t / r['prefill']:,.0f}" for r in results) + " |",
            "| ms | " + " | ".join(f"{r['prefill'] * 1e3:.1f}" for r in results) + " |",
            "| floor ms | " + " | ".join(f"{prefill_floor(r, t, cfg) * 1e3:.1f}" for r in results)
            + " |"]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama8b")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--prefill", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-graphs", action="store_true", help="eager decode steps")
    ap.add_argument("--timeout", type=float, default=540.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.device == "cuda" and torch.cuda.device_count() < max(args.tp):
        print(f"needs {max(args.tp)} GPUs, {torch.cuda.device_count()} visible")
        return 2
    results = []
    for n in args.tp:
        t0 = time.perf_counter()
        results.append(run_tp(n, args))
        print(f"TP {n} done in {time.perf_counter() - t0:.0f} s", flush=True)
    text = report(results, args)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
