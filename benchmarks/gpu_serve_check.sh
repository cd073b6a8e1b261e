#!/usr/bin/env bash
# `pdmesh serve` on one GPU, 1 prefill + 1 decode worker process, answering one chat
# request through the OpenAI REST API; prints the KV transfer path each worker used.
# Usage (repo root, after `source benchmarks/gpu_env.sh` on a GPU machine):
#   bash benchmarks/gpu_serve_check.sh [auto|direct|staged] [port]
MODE=${1:-auto}
PORT=${2:-8000}
LOG=${LOG:-/tmp/serve_$MODE.log}
# the mesh's cluster token, known here so the registry can be asked below
export PDMESH_CLUSTER_TOKEN=${PDMESH_CLUSTER_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')}
PDMESH_DEVICE=${DEVICE:-cuda} PDMESH_KV_TRANSFER_MODE=$MODE python3 -m pdmesh.cli serve --port $PORT \
  --grpc-port $((PORT + 51)) --prefill 1 --decode 1 >"$LOG" 2>&1 &
PID=$!
for _ in $(seq 240); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
  kill -0 $PID 2>/dev/null || break
  sleep 1
done
echo "== serve ($MODE) log:"
grep -E "listening|KV transfer|Error|error|Traceback" "$LOG" | head -20
echo "== chat completion:"
curl -s "http://127.0.0.1:$PORT/v1/chat/completions" -H 'Content-Type: application/json' \
  -d '{"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0}'
echo
echo "== registry view of the workers' transfer endpoints:"
python3 - "$LOG" <<'EOF'
import re, sys
from pdmesh import auth
from pdmesh.v1 import registry_pb2 as rpb, registry_pb2_grpc as rg
text = open(sys.argv[1]).read()
m = re.search(r"registry listening on (\S+)", text)
if m:
    stub = rg.RegistryStub(auth.insecure_channel(m.group(1)))  # PDMESH_CLUSTER_TOKEN
    for w in stub.ListWorkers(rpb.ListWorkersRequest(), timeout=5).workers:
        print(w.address, rpb.WorkerRole.Name(w.role), "transfer protocol:", w.transfer.protocol,
              "layout dtype:", w.kv_layout.dtype)
EOF
kill -INT $PID 2>/dev/null
wait $PID 2>/dev/null
tail -5 "$LOG"
