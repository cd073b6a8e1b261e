#!/usr/bin/env bash
# pdmesh plan -> real 1P1D and recommended deployment (pdmesh bench) -> pdmesh simulate.
#
#   bash benchmarks/plan_and_simulate.sh [OUT_DIR]        (default /tmp/plan_and_simulate)
#
# 1. `pdmesh serve` 1P1D; `pdmesh plan` measures prefill capacity (output 1, concurrency
#    sweep) and decode capacity (SlowDown, fill, release), recommends xPyD for TARGET_RATE
#    and writes OUT/profile.json (the simulator's Profile, cpu_cores = this machine's cores).
# 2. `pdmesh bench` on that 1P1D, then on the recommended deployment (2P1D if plan says
#    1P1D), same workload and SLOs (goodput), one bench run per concurrency. Around each
#    run the CPU time of every process outside the mesh and the load generator is read
#    from /proc: this machine is shared, and what others take is not left to the workers.
# 3. `pdmesh simulate --profile OUT/profile.json --cpu-cores (cores - others) --compare`
#    each run: simulated vs measured TTFT and output tok/s.
# Every worker runs with OMP_NUM_THREADS=1; the whole script holds the CPU lock exclusively.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PDMESH_LOCKED:-}" ]; then
    exec env PDMESH_LOCKED=1 flock -x /tmp/pdmesh-cpu.lock bash "$0" "$@"
fi
OUT=${1:-/tmp/plan_and_simulate}
PD=.venv/bin/pdmesh
WORKLOAD=(--input-len 256 384 --output-len 32)
SLO=(--slo-ttft 4 --slo-tpot 0.15)
TARGET_RATE=${TARGET_RATE:-1.5}
CORES=$(getconf _NPROCESSORS_ONLN)  # not nproc: it honours OMP_NUM_THREADS
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
mkdir -p "$OUT"
SERVE_PID=

start_mesh() {  # start_mesh P D: pdmesh serve; sets REGISTRY
    # a 60 s lease: on 2 busy cores a multi-second prefill step delays a worker's heartbeat
    "$PD" serve --prefill "$1" --decode "$2" --port 18800 --grpc-port 18851 \
        --heartbeat-max-failure 12 --worker-arg=--kv-cache-bytes=300000000 \
        > "$OUT/serve_$1P$2D.log" 2>&1 &
    SERVE_PID=$!
    for _ in $(seq 300); do
        if grep -q "pdmesh serve: ready" "$OUT/serve_$1P$2D.log"; then break; fi
        sleep 1
    done
    REGISTRY=$(grep -o "ready — registry [^,]*" "$OUT/serve_$1P$2D.log" | awk '{print $4}')
    [ -n "$REGISTRY" ] || { cat "$OUT/serve_$1P$2D.log"; exit 1; }
    echo "mesh $1P$2D up (registry $REGISTRY)"
}
stop_mesh() {
    if [ -n "$SERVE_PID" ]; then kill -TERM "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" || true; fi
    SERVE_PID=
}
trap stop_mesh EXIT
URL=http://127.0.0.1:18800/v1

# others.py SERVE_PID OUT_FILE -- CMD...: run CMD; write the cores used meanwhile by every
# process outside SERVE_PID's tree and CMD (from /proc/stat and /proc/PID/stat)
cat > "$OUT/others.py" <<'EOF'
import os, subprocess, sys, time
def busy():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return f[0] + f[1] + f[2] + f[5] + f[6] + f[7]  # user nice system irq softirq steal
def tree(root):
    kids = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [root]
    while todo:
        p = todo.pop(); out.append(p); todo += kids.get(p, [])
    return out
def cpu(pids):
    t = 0
    for p in pids:
        try:
            f = open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()
            t += int(f[11]) + int(f[12])
        except OSError:
            pass
    return t
serve, out, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[4:]
mesh = tree(serve)
b0, m0, t0 = busy(), cpu(mesh), time.monotonic()
r0 = os.times()
rc = subprocess.call(cmd)
r1 = os.times()
b1, m1, t1 = busy(), cpu(mesh), time.monotonic()
hz = os.sysconf("SC_CLK_TCK")
mine = (m1 - m0) / hz + (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
others = max(0.0, ((b1 - b0) / hz - mine) / (t1 - t0))
open(out, "w").write(f"{others:.2f}\n")
print(f"[others] {others:.2f} cores used outside the mesh and the load generator")
sys.exit(rc)
EOF
PY=.venv/bin/python

echo "== 1. plan on 1P1D"
start_mesh 1 1
$PY "$OUT/others.py" "$SERVE_PID" "$OUT/plan.others" -- "$PD" plan --base-url "$URL" \
    --registry "$REGISTRY" "${WORKLOAD[@]}" "${SLO[@]}" --target-rate "$TARGET_RATE" \
    --prefill-concurrency 1 2 4 --prefill-number-per-client 3 --decode-batch 2 4 8 \
    --cpu-cores "$CORES" --output "$OUT/profile.json" | tee "$OUT/plan.txt"
REC=$(grep -o "RECOMMENDATION: [0-9]*P[0-9]*D" "$OUT/plan.txt" | awk '{print $2}')
[ "$REC" != "1P1D" ] || REC=2P1D

bench_all() {  # bench_all DEPLOYMENT: one bench run per concurrency on the running mesh
    for C in 4 8; do
        $PY "$OUT/others.py" "$SERVE_PID" "$OUT/$1_c$C.others" -- "$PD" bench \
            --base-url "$URL" "${WORKLOAD[@]}" "${SLO[@]}" --parallel "$C" --warmup 4 \
            --label "$1" --no-progress --output "$OUT/$1_c$C.json"
    done
}
echo "== 2a. bench 1P1D"
bench_all 1P1D
stop_mesh
echo "== 2b. bench $REC"
P=${REC%P*}; D=${REC#*P}; D=${D%D}
start_mesh "$P" "$D"
bench_all "$REC"
stop_mesh

echo "== 3. simulate from plan's profile, with the cores others left free"
for RUN in 1P1D_c4 1P1D_c8 "${REC}_c4" "${REC}_c8"; do
    FREE=$($PY -c "print(max(0.5, $CORES - float(open('$OUT/$RUN.others').read())))")
    echo "-- $RUN: others used $(cat "$OUT/$RUN.others") cores -> --cpu-cores $FREE"
    "$PD" simulate --profile "$OUT/profile.json" "${WORKLOAD[@]}" --cpu-cores "$FREE" \
        --compare "$OUT/$RUN.json" | tee "$OUT/simulate_$RUN.txt"
done
"$PD" bench --compare "$OUT"/1P1D_c*.json "$OUT/${REC}"_c*.json --markdown
$PY - "$OUT"/1P1D_c*.json "$OUT/${REC}"_c*.json <<'EOF'
import sys
from pdmesh.bench.report import load_results
print("| deployment | concurrency | goodput req/s | SLO attainment |\n|---|---|---|---|")
for f in sys.argv[1:]:
    for s in load_results(open(f).read())[0]:
        print(f"| {s.label} | {s.concurrency} | {s.goodput_req_s:.3f} | {s.slo_attainment:.0%} |")
EOF
