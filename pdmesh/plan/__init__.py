"""The ratio method (`pdmesh plan`): measure prefill and decode capacity on a mesh, size
xPyD, fit the simulator's Profile."""
