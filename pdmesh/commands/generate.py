"""`pdmesh generate`: one prompt through the offline engine."""
from __future__ import annotations

import argparse
import json
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct), a HF folder or a .gguf file")
    p.add_argument("--prompt", required=True, help="prompt text (a user message with --chat)")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--json", action="store_true",
                   help='print {"text", "token_ids", "finish_reason"} as JSON')


def run(args: argparse.Namespace) -> int:
    from pdmesh.runtime.engine import Engine
    from pdmesh.runtime.sampling_params import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                ignore_eos=args.ignore_eos)
        engine = Engine(model=args.model)
        if args.chat:
            out = engine.generate(messages=[{"role": "user", "content": args.prompt}],
                                  params=params)[0]
        else:
            out = engine.generate(args.prompt, params)[0]
    except (ValueError, FileNotFoundError) as e:
        print(f"pdmesh generate: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason}))
    else:
        print(out.text)
    return 0
