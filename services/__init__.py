"""The mesh's gRPC services, importable as `pdmesh.services` (setup.py maps services/).

bootstrap: the registry (membership, heartbeat leases, Watch); gateway, prefill and
decode: the public API and the two worker roles (see DESIGN.md).
"""
