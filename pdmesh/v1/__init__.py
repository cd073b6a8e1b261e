"""Generated gRPC/protobuf stubs of package pdmesh.v1 (scripts/gen_protos.py; do not edit)."""
