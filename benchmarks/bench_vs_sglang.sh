#!/usr/bin/env bash
# `pdmesh bench` vs sglang bench_serving 0.5.2 against one `pdmesh serve` 1P1D mesh, with the
# same workload (bench_serving's random-ids prompts, seed 1, fixed lengths, ignore_eos,
# completions API), back to back per concurrency under an exclusive CPU lock, alternating
# which tool goes first from round to round. Prints a markdown table of both tools' numbers.
#
#   benchmarks/bench_vs_sglang.sh [OUT_DIR]
# env: BASE_URL (use a running endpoint, e.g. http://127.0.0.1:8000; default: start a mesh)
#      IN=128 OUT=32 CONCS="2 8" NUMS="16 32" ROUNDS=3 LOCK=/tmp/pdmesh-cpu.lock
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT_DIR=${1:-/tmp/bench_vs_sglang}
IN=${IN:-128}; OUT=${OUT:-32}; CONCS=(${CONCS:-2 8}); NUMS=(${NUMS:-16 32}); ROUNDS=${ROUNDS:-3}
LOCK=${LOCK:-/tmp/pdmesh-cpu.lock}
TOK=${TOK:-/tmp/smol_tok}
mkdir -p "$OUT_DIR"; rm -f "$OUT_DIR"/*.json "$OUT_DIR"/*.jsonl

if [ ! -f "$TOK/tokenizer.json" ]; then  # bench_serving needs a tokenizer folder, not a GGUF
  $PY -c "from pdmesh.runtime.loader import resolve_model_path as r; from transformers import AutoTokenizer as A; p=r('default'); A.from_pretrained(p.parent, gguf_file=p.name).save_pretrained('$TOK')"
fi

if [ -z "${BASE_URL:-}" ]; then
  OMP_NUM_THREADS=1 $PY -m pdmesh.cli serve --port 0 --grpc-port 0 > "$OUT_DIR/serve.log" 2>&1 &
  SERVE_PID=$!
  trap 'kill $SERVE_PID 2>/dev/null; wait $SERVE_PID 2>/dev/null || true' EXIT
  for _ in $(seq 240); do
    BASE_URL=$(sed -n 's/.*pdmesh serve: ready .*gateway \([0-9.:]*\).*/http:\/\/\1/p' "$OUT_DIR/serve.log")
    [ -n "$BASE_URL" ] && break
    kill -0 $SERVE_PID || { cat "$OUT_DIR/serve.log"; exit 1; }
    sleep 1
  done
  [ -n "$BASE_URL" ] || { echo "mesh did not start"; cat "$OUT_DIR/serve.log"; exit 1; }
fi
echo "endpoint: $BASE_URL"
for _ in $(seq 100); do  # the gateway learns its workers from the registry a moment after ready
  curl -sf "$BASE_URL/v1/completions" -H 'Content-Type: application/json' \
    -d '{"model": "default", "prompt": "hi", "max_tokens": 1}' > /dev/null && break
  sleep 0.3
done

run_pdmesh() {  # $1 concurrency, $2 number, $3 round
  $PY -m pdmesh.cli bench --base-url "$BASE_URL/v1" --backend completions --tokenizer "$TOK" \
    --input-len "$IN" --output-len "$OUT" --parallel "$1" --number "$2" --warmup 1 \
    --no-progress --output "$OUT_DIR/pdmesh_c$1_r$3.json"
}
run_sglang() {
  HF_HUB_OFFLINE=1 $PY -m sglang.bench_serving --backend sglang-oai --base-url "$BASE_URL" \
    --dataset-name random-ids --random-input-len "$IN" --random-output-len "$OUT" \
    --random-range-ratio 1 --num-prompts "$2" --max-concurrency "$1" --model default \
    --tokenizer "$TOK" --disable-tqdm --output-file "$OUT_DIR/sglang_c$1_r$3.jsonl" \
    | sed -n '/Serving Benchmark Result/,/^====*$/p'
}

exec 9>"$LOCK"
# untimed warm-up at the highest concurrency: a fresh mesh's first batches are slower
flock -x 9
$PY -m pdmesh.cli bench --base-url "$BASE_URL/v1" --tokenizer "$TOK" --input-len "$IN" \
  --output-len "$OUT" --parallel "${CONCS[-1]}" --number "${NUMS[-1]}" --no-progress > /dev/null || true
flock -u 9
for r in $(seq "$ROUNDS"); do
  for i in "${!CONCS[@]}"; do
    c=${CONCS[$i]}; n=${NUMS[$i]}
    flock -x 9  # both tools back to back under one exclusive hold
    if (( r % 2 )); then run_pdmesh "$c" "$n" "$r"; run_sglang "$c" "$n" "$r"
    else run_sglang "$c" "$n" "$r"; run_pdmesh "$c" "$n" "$r"; fi
    flock -u 9
  done
done

$PY - "$OUT_DIR" <<'PYEOF'
import collections, glob, json, re, sys
from pdmesh.bench.report import from_json
d, rows = sys.argv[1], collections.defaultdict(list)  # (c, metric) -> [(ours, theirs)]
for f in glob.glob(f"{d}/pdmesh_c*_r*.json"):
    s = from_json(open(f).read())[0]
    g = json.loads(open(f.replace("pdmesh_", "sglang_") + "l").readline())
    assert s.completed == g["completed"] == s.number and s.failed == 0, (f, g["completed"])
    c, r = map(int, re.search(r"_c(\d+)_r(\d+)", f).groups())
    for name, ours, theirs in (("mean TTFT s", s.ttft.mean, g["mean_ttft_ms"] / 1e3),
                               ("mean TPOT s", s.tpot.mean, g["mean_tpot_ms"] / 1e3),
                               ("output tok/s", s.output_tok_s, g["output_throughput"])):
        rows[c, name].append((r, ours, theirs))
print("\n| concurrency | metric | pdmesh bench (per round) | bench_serving (per round) "
      "| pdmesh mean | bench_serving mean | diff of means |")
print("|---|---|---|---|---|---|---|")
for (c, name), vals in sorted(rows.items()):
    vals.sort()
    ours, theirs = [v[1] for v in vals], [v[2] for v in vals]
    mo, mt = sum(ours) / len(ours), sum(theirs) / len(theirs)
    fmt = lambda xs: " / ".join(f"{x:.4g}" for x in xs)  # noqa: E731
    print(f"| {c} | {name} | {fmt(ours)} | {fmt(theirs)} | {mo:.4g} | {mt:.4g} | "
          f"{100 * (mo - mt) / mt:+.1f}% |")
PYEOF
