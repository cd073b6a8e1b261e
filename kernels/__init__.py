"""Triton kernels with their torch references, importable as `pdmesh.kernels`
(setup.py maps kernels/). Empty until the GPU runtime issue."""
