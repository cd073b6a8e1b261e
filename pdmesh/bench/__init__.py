"""Load generation and metrics for OpenAI-compatible endpoints (`pdmesh bench`)."""
