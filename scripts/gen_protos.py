#!/usr/bin/env python3
"""Generate the Python stubs of protos/pdmesh/v1/*.proto into pdmesh/v1/.

    .venv/bin/python scripts/gen_protos.py            # regenerate the committed stubs
    .venv/bin/python scripts/gen_protos.py --out DIR  # write DIR/pdmesh/v1/... instead

The .proto files live under protos/ at the path that matches their package
(protos/pdmesh/v1/x.proto, package pdmesh.v1), so protoc's generated imports
(`from pdmesh.v1 import common_pb2`) resolve inside the pdmesh package with no
post-processing. The output is a pure function of the .proto files and the
grpcio-tools version (pinned in pyproject's `test` extra); tests/test_protos.py
regenerates into a temp dir and compares byte for byte. Never hand-edit the stubs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("pdmesh") / "v1"
# pdmesh/v1/__init__.py is generated too, so the whole folder is output.
INIT_TEXT = ('"""Generated gRPC/protobuf stubs of package pdmesh.v1 '
             '(scripts/gen_protos.py; do not edit)."""\n')
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def include_paths() -> list[str]:
    """protoc include roots: our protos, grpc_tools' well-known types, googleapis' protos."""
    import grpc_tools
    import google.api.annotations_pb2 as annotations

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    # .../site-packages/google/api/annotations_pb2.py -> .../site-packages
    googleapis = Path(annotations.__file__).resolve().parent.parent.parent
    return [str(PROTO_ROOT), str(well_known), str(googleapis)]


def proto_files() -> list[str]:
    """The .proto files, relative to protos/, sorted (deterministic order)."""
    return sorted(p.relative_to(PROTO_ROOT).as_posix()
                  for p in (PROTO_ROOT / PACKAGE_DIR).glob("*.proto"))


def protoc(args: list[str]) -> None:
    """Run grpc_tools' bundled protoc; raise with its exit code on failure."""
    from grpc_tools import protoc as _protoc

    code = _protoc.main(["grpc_tools.protoc", *args])
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")


def generate(out: Path) -> list[Path]:
    """Write the stubs under out/pdmesh/v1/ (stale generated files removed); return them."""
    pkg = out / PACKAGE_DIR
    pkg.mkdir(parents=True, exist_ok=True)
    for old in pkg.iterdir():
        if old.name.endswith(GENERATED_SUFFIXES):
            old.unlink()
    includes = [f"-I{p}" for p in include_paths()]
    protoc([*includes, f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *proto_files()])
    (pkg / "__init__.py").write_text(INIT_TEXT)
    return sorted(p for p in pkg.iterdir() if p.is_file() and p.suffix in (".py", ".pyi"))


def descriptor_set(path: Path) -> Path:
    """Write a FileDescriptorSet of our protos with source info (comments) to `path`."""
    includes = [f"-I{p}" for p in include_paths()]
    protoc([*includes, "--include_source_info", f"--descriptor_set_out={path}",
            *proto_files()])
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT,
                        help="output root; stubs go to OUT/pdmesh/v1 (default: the repo)")
    args = parser.parse_args(argv)
    files = generate(args.out)
    for f in files:
        print(os.path.relpath(f, Path.cwd()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
