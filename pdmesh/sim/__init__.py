"""Discrete-event simulator of PxDy deployments (`pdmesh simulate`): Profile, Simulator,
calibration to measured tables."""
