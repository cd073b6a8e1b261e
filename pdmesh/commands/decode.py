"""`pdmesh decode`: run one decode worker, or with `--role colocated` a worker that
prefills and decodes in one engine (no KV transfer).

Prints `decode listening on HOST:PORT` (or `colocated listening on ...`) once serving
and registered; SIGTERM/SIGINT drains in-flight streams, then deregisters.
"""
from __future__ import annotations

import argparse

from pdmesh.commands import worker_common


def add_arguments(p: argparse.ArgumentParser) -> None:
    worker_common.add_arguments(p, "decode")


def run(args: argparse.Namespace) -> int:
    from pdmesh.services.decode.server import create_server

    return worker_common.run_worker(args, "decode", create_server)
