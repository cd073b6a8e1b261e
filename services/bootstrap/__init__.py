"""The bootstrap registry: worker membership with heartbeat leases (`pdmesh registry`).

registry.py holds the lease table (plain Python, no grpc); server.py adapts it to the
`pdmesh.v1.Registry` gRPC service.
"""
