"""Prefill worker: pdmesh.v1.Prefill servicer (server.py) and its room table (rooms.py)."""
