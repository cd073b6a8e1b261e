"""The mesh's gRPC services, importable as `pdmesh.services` (through
the symlink pdmesh/services -> ../services).

bootstrap: the registry (membership, heartbeat leases, Watch); gateway, prefill and
decode: the public API and the two worker roles (see DESIGN.md).
"""
