"""Traces leave a real service process by OTLP (gRPC and HTTP) and reach a receiver
running in the test, as they would reach an OpenTelemetry Collector or Jaeger."""
from __future__ import annotations

import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tpb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

from mesh_procs import start, terminate, wait_until, worker_env
from pdmesh.v1 import registry_pb2 as rpb
from pdmesh.v1 import registry_pb2_grpc as rgrpc


class Received:
    """(service.name, span name) of every span exported to the receiver."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def add(self, req: tpb.ExportTraceServiceRequest) -> None:
        with self.lock:
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes
                                if a.key == "service.name"), "?")
                self.spans += [(service, s.name) for ss in rs.scope_spans for s in ss.spans]


def grpc_receiver(got: Received):
    class TraceService(tgrpc.TraceServiceServicer):
        def Export(self, request, context):
            got.add(request)
            return tpb.ExportTraceServiceResponse()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    tgrpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return f"http://127.0.0.1:{port}", lambda: server.stop(0)


def http_receiver(got: Received):
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/traces", self.path
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.add(tpb.ExportTraceServiceRequest.FromString(body))
            out = tpb.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server.shutdown


@pytest.mark.parametrize("protocol,ratio", [("grpc", "1"), ("http/protobuf", "1"),
                                            ("grpc", "0")])
def test_registry_exports_spans_by_otlp(protocol, ratio):
    got = Received()
    endpoint, stop = (grpc_receiver if protocol == "grpc" else http_receiver)(got)
    proc, addr = start("registry", "--host", "127.0.0.1", "--otlp-endpoint", endpoint,
                       "--otlp-protocol", protocol, "--trace-sample-ratio", ratio,
                       env=worker_env(OTEL_BSP_SCHEDULE_DELAY="100"))
    try:
        stub = rgrpc.RegistryStub(grpc.insecure_channel(addr))
        stub.Register(rpb.RegisterRequest(role=rpb.WORKER_ROLE_PREFILL, address="127.0.0.1:9",
                                          model_id="m"), timeout=10)
        stub.ListWorkers(rpb.ListWorkersRequest(), timeout=10)
        want = {("pdmesh-registry", "/pdmesh.v1.Registry/Register"),
                ("pdmesh-registry", "/pdmesh.v1.Registry/ListWorkers")}
        arrived = wait_until(lambda: want <= set(got.spans), 2 if ratio == "0" else 15)
        assert arrived == (ratio == "1"), got.spans
        if ratio == "0":
            assert got.spans == []  # sampled out: nothing at all is exported
    finally:
        terminate(proc)
        stop()


@pytest.mark.parametrize("content,rc,message", [
    (None, 2, "No such file"), ("garbage\n", 2, "not a JSON line"),
    ("[1, 2]\n", 2, "not an OTLP"), ("", 1, "no matching trace")])
def test_trace_show_bad_files(tmp_path, content, rc, message):
    import subprocess
    import sys

    path = tmp_path / "spans.jsonl"
    if content is not None:
        path.write_text(content)
    out = subprocess.run([sys.executable, "-m", "pdmesh.cli", "trace", "show", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == rc and message in out.stderr, out.stderr
