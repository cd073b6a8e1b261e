"""Decode worker (and colocated role): pdmesh.v1.Decode servicer and its rooms/quarantine."""
