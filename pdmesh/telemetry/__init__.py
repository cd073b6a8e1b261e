"""Observability shared by every service: OpenTelemetry tracing (`tracing`), OTLP/JSON
span files and their text rendering (`otlp_file`, `trace_view`), Prometheus metrics
(`metrics`). Never imported by pdmesh.runtime."""
