"""`pdmesh dev-ca DIR`: mint a throw-away CA and certificates for a TLS mesh (pdmesh/tls.py).

    pdmesh dev-ca ./tls [--host node1 --host 10.0.0.5]
    pdmesh serve --tls-dir ./tls          # the whole mesh on mTLS

Writes ca.pem, ca-key.pem, server.pem + server-key.pem (every service; SANs localhost,
127.0.0.1, ::1 and each --host) and client.pem + client-key.pem (tools). For development
and tests: a production mesh uses certificates from its own CA.
"""
from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to write the PEM files into (created if missing)")
    p.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another name or IP address peers dial (a SAN of server.pem; "
                        "repeatable), e.g. each worker's --hostname")
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")


def run(args: argparse.Namespace) -> int:
    from pdmesh.tls import mint_dev_ca

    if args.days < 1:
        print("pdmesh dev-ca: --days must be >= 1", file=sys.stderr)
        return 2
    try:
        files = mint_dev_ca(args.dir, args.host, args.days)
    except OSError as e:
        print(f"pdmesh dev-ca: cannot write {args.dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(f"pdmesh dev-ca: wrote {', '.join(p.name for p in files.values())} to {args.dir} "
          f"(server.pem SANs: localhost, 127.0.0.1, ::1{''.join(', ' + h for h in args.host)})")
    print(f"run the mesh on mTLS: pdmesh serve --tls-dir {args.dir}")
    return 0
