"""`--cluster-token-file` and the TLS flags, which every service command takes (and
`pdmesh plan`, `pdmesh serve`, which hands them to every child).

The token itself never goes on a command line (it would show in `ps`): a file, or
PDMESH_CLUSTER_TOKEN in the environment. TLS flags name files (pdmesh/tls.py); they are
checked here, so a bad one is one line and exit 2 before anything starts.
"""
from __future__ import annotations

import argparse
import os

from pdmesh.config import AuthConfig, auth_config_from_env


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--cluster-token-file PATH."""
    p.add_argument("--cluster-token-file", default=None, metavar="PATH",
                   help="file holding the mesh's shared secret: internal RPCs (registry, "
                        "workers) carry it and refuse callers without it (env "
                        "PDMESH_CLUSTER_TOKEN; none: internal RPCs are unauthenticated)")
    p.add_argument("--tls-dir", default=None, metavar="DIR",
                   help="TLS from a `pdmesh dev-ca DIR` folder: --tls-cert DIR/server.pem "
                        "--tls-key DIR/server-key.pem --tls-ca DIR/ca.pem")
    p.add_argument("--tls-cert", default=None, metavar="PEM",
                   help="this service's certificate (chain): its gRPC ports serve TLS and "
                        "its channels present it (env PDMESH_TLS_CERT; default: plaintext)")
    p.add_argument("--tls-key", default=None, metavar="PEM",
                   help="the private key of --tls-cert (env PDMESH_TLS_KEY)")
    p.add_argument("--tls-ca", default=None, metavar="PEM",
                   help="CA that peers' certificates must chain to; with it, registry and "
                        "worker ports require a client certificate it signed (mTLS, which "
                        "then stands for the cluster token) (env PDMESH_TLS_CA)")


def config_from_args(args: argparse.Namespace, serves: bool = True) -> AuthConfig:
    """Env, then the flags (flags win; --tls-cert/-key/-ca over --tls-dir). ValueError
    (one line) when the token file is unreadable/empty or a TLS file is missing, bad, or
    its key is not the certificate's; `serves`: a CA without a certificate is refused."""
    from pdmesh import tls
    from pdmesh.auth import read_secret_file

    config = auth_config_from_env(AuthConfig())
    if getattr(args, "cluster_token_file", None):
        config = config.replace(cluster_token=read_secret_file(args.cluster_token_file))
    files: dict[str, str] = {}
    if getattr(args, "tls_dir", None):
        files = dict(zip(("tls_cert", "tls_key", "tls_ca"), tls.dir_files(args.tls_dir)))
    files.update({k: getattr(args, k) for k in ("tls_cert", "tls_key", "tls_ca")
                  if getattr(args, k, None)})
    config = config.replace(**{k: os.path.abspath(v) for k, v in files.items()})
    material = tls.load(config)
    if serves:
        tls.require_server_identity(material)
    return config


def forward(config: AuthConfig) -> list[str]:
    """The TLS flags that give a child process `config`'s files (`pdmesh serve`)."""
    return [arg for flag, path in (("--tls-cert", config.tls_cert),
                                   ("--tls-key", config.tls_key), ("--tls-ca", config.tls_ca))
            if path for arg in (flag, path)]


def setup(config: AuthConfig) -> None:
    """Make `config`'s token and TLS files this process's: its servers check the token and
    serve TLS, its clients send the token over TLS."""
    from pdmesh import auth, tls

    auth.configure(config.cluster_token)
    tls.configure(tls.load(config))
