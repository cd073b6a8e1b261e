"""The gateway: gRPC pdmesh.v1.Gateway + OpenAI-compatible REST, routing over the registry."""
