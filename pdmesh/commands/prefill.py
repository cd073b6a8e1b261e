"""`pdmesh prefill`: run one prefill worker (multi-host deployments, or under `pdmesh serve`).

Prints `prefill listening on HOST:PORT` once serving and registered; SIGTERM/SIGINT
drains in-flight rooms, then deregisters.
"""
from __future__ import annotations

import argparse

from pdmesh.commands import worker_common


def add_arguments(p: argparse.ArgumentParser) -> None:
    worker_common.add_arguments(p, "prefill")


def run(args: argparse.Namespace) -> int:
    from pdmesh.services.prefill.server import create_server

    return worker_common.run_worker(args, "prefill", create_server)
