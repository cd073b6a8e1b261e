"""Worker-side plumbing shared by the prefill and decode services (no grpc here)."""
