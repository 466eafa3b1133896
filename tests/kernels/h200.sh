#!/bin/bash
# One H200 call: GPU tests of the kernels (real kernels for every CPU test too, the AOT cubin path,
# cubins carried from the CPU machine), the sweep of experts configs (`--tune`), then the `kernels`
# benchmark with the configs the sweep picked (skipped with `tune`). Writes logs and results under $OUT.
# Usage (device run): bash tests/kernels/h200.sh [tune]
# Carried (ignored paths): .whl (onnx-graphsurgeon, which `import moexport` needs, and pytest-xdist +
# execnet: the tests run in 8 processes); .carry/aot (cubins built on the CPU machine);
# .carry/tcache if present (Triton's cache of an earlier call as gzipped tar parts of 15 MB: unchanged
# kernels load instead of compiling). A `tune` call leaves its cache in $OUT/triton_cache.tgz.*.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MOEXPORT_AOT_DIR=$PWD/.carry/aot
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
ls .carry/tcache/* >/dev/null 2>&1 && cat .carry/tcache/* | tar xz -C $TRITON_CACHE_DIR
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
# the sweep's kernels compile (12 processes) while the tests run; the timing runs then load them
timeout 300 python3 -m moexport.bench kernels --tune --compile-only --jobs 12 > $OUT/compile.log 2>&1 &
COMPILING=$!
START=$SECONDS
timeout 200 python3 -m pytest -q $(python3 -c "import xdist" 2>/dev/null && printf -- '-n 8') tests/kernels -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -4
echo "tests: $((SECONDS - START)) s"
wait $COMPILING
echo "compile: $((SECONDS - START)) s"; tail -3 $OUT/compile.log
timeout 200 python3 -m moexport.bench kernels --tune -o $OUT 2>&1 > $OUT/tune.log | tail -5
grep -v "^{" $OUT/tune.log | tail -22
echo "tune: $((SECONDS - START)) s"
if [ "$1" = "tune" ]; then
  tar czf - -C $TRITON_CACHE_DIR . | split -b 15M - $OUT/triton_cache.tgz. && ls -la $OUT
else
  CONFIGS=$([ -f $OUT/kernels_tuned_h200.json ] && echo "--configs $OUT/kernels_tuned_h200.json")
  timeout 240 python3 -m moexport.bench kernels -o $OUT --name kernels_h200 $CONFIGS 2>&1 | tail -3
  sed -n '/| shape/,$p' $OUT/kernels_h200.md 2>/dev/null
fi
echo "total: $((SECONDS - START)) s"
