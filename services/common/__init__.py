"""Plumbing shared by worker services: engine host, transport, registry + watch."""
