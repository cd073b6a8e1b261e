"""`pdmesh` command line: one subcommand per module under pdmesh/commands (imported lazily)."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, help); each module has add_arguments(parser) and run(args) -> int
COMMANDS = {
    "generate": ("pdmesh.commands.generate", "generate text with the offline engine"),
    "bench-runtime": ("pdmesh.commands.bench_runtime",
                      "time the runtime's decode and prefill against transformers"),
    "registry": ("pdmesh.commands.registry",
                 "run the bootstrap registry (worker membership, heartbeat leases)"),
    "prefill": ("pdmesh.commands.prefill",
                "run a prefill worker (computes prompts, writes their KV into decode workers)"),
    "decode": ("pdmesh.commands.decode",
               "run a decode worker (or --role colocated: prefill + decode in one engine)"),
    "gateway": ("pdmesh.commands.gateway",
                "run the gateway: gRPC pdmesh.v1.Gateway + OpenAI-compatible REST"),
    "serve": ("pdmesh.commands.serve",
              "run the whole mesh on this machine: registry, workers, gateway"),
    "trace": ("pdmesh.commands.trace",
              "show traces from a --trace-file as span trees with durations"),
    "bench": ("pdmesh.commands.bench",
              "load-test an OpenAI-compatible endpoint (sglang bench_serving metrics)"),
    "simulate": ("pdmesh.commands.simulate",
                 "predict bench tables of xPyD deployments (discrete-event simulator)"),
    "plan": ("pdmesh.commands.plan",
             "measure prefill and decode capacity on a mesh and recommend xPyD"),
    "dev-ca": ("pdmesh.commands.dev_ca",
               "write a throw-away CA and certificates for a TLS mesh (--tls-dir)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


# commands whose process moves KV pages with Mooncake, given their arguments (`serve`
# checks for its prefill/decode children itself, before it starts any)
NEEDS_MOONCAKE = {
    "prefill": lambda args: True,
    "decode": lambda args: args.role != "colocated",
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in (*NEEDS_MOONCAKE, "serve"):
        return importlib.import_module(args._module).run(args)
    from pdmesh.transfer import MooncakeUnavailable, check_transport

    try:  # a missing engine: one line naming the install command, exit 2, before any work
        if NEEDS_MOONCAKE.get(args.command, lambda _: False)(args):
            check_transport("mooncake")
        return importlib.import_module(args._module).run(args)
    except MooncakeUnavailable as e:
        print(f"pdmesh: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
