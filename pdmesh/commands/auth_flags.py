"""`--cluster-token-file`, the flag every service command takes (and `pdmesh plan`).

The token itself never goes on a command line (it would show in `ps`): a file, or
PDMESH_CLUSTER_TOKEN in the environment.
"""
from __future__ import annotations

import argparse

from pdmesh.config import AuthConfig, auth_config_from_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--cluster-token-file PATH."""
    p.add_argument("--cluster-token-file", default=None, metavar="PATH",
                   help="file holding the mesh's shared secret: internal RPCs (registry, "
                        "workers) carry it and refuse callers without it (env "
                        "PDMESH_CLUSTER_TOKEN; none: internal RPCs are unauthenticated)")


def config_from_args(args: argparse.Namespace) -> AuthConfig:
    """Env, then the flag (the flag wins). ValueError when the file is unreadable/empty."""
    from pdmesh.auth import read_secret_file

    config = auth_config_from_env(AuthConfig())
    if getattr(args, "cluster_token_file", None):
        config = config.replace(cluster_token=read_secret_file(args.cluster_token_file))
    return config


def setup(config: AuthConfig) -> None:
    """Make `config`'s token this process's: its servers check it, its clients send it."""
    from pdmesh import auth

    auth.configure(config.cluster_token)
