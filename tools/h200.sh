#!/bin/bash
# One H200 call: GPU tests of the kernels (real kernels for every CPU test too, CUDA-graph replays, the
# AOT cubin path, cubins carried from the CPU machine), optionally a sweep of experts configs
# (tools/tune_kernels.py), then the `kernels` benchmark. Logs and results go to $OUT (at most 7 files: the
# device tool returns 8; the sweep's output goes into log.txt).
# Usage (device run): bash tools/h200.sh [sweep|tiles|tune]
#   default: the benchmark of every cell with the shipped configs.
#   sweep:   first the sequence sweep (gather / fused / split, summation inline / pass / atomic, shipped
#            tiles) at T = 16, 256, 4096 and 32768 (`tune_kernels.py --sequences`), then the benchmark with its
#            picks; more arguments go to the sweep, as with tiles.
#   tiles:   first the tile sweep (experts and route tiles of the shipped sequences) at T = 256 and 32768,
#            then the benchmark with its picks; more arguments go to the sweep (e.g. --shapes large
#            --tokens 256; the sweep's files keep their names either way).
#   tune:    the tile sweep of every cell (`tune_kernels.py`), no benchmark; Triton's cache left in
#            $OUT/triton_cache.tgz.* (carry it as .carry/tcache next time).
# A sweep writes its timings (<name>.json) and its picks (<name>_picks.json, in the format of
# moexport/kernels/configs.json: ship them with `python tools/tune_kernels.py --ship FILE`).
# Carried (ignored paths): .whl (onnx-graphsurgeon, which `import moexport` needs, and pytest-xdist +
# execnet: the tests run in 8 processes); .carry/aot (cubins built on the CPU machine by
# `python tests/kernels/test_aot.py .carry/aot`); .carry/tcache if present (Triton's cache of an earlier
# call as gzipped tar parts of 15 MB: unchanged kernels load instead of compiling).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MOEXPORT_AOT_DIR=$PWD/.carry/aot
export TRITON_CACHE_DIR=/tmp/triton_cache
mkdir -p $TRITON_CACHE_DIR
ls .carry/tcache/* >/dev/null 2>&1 && cat .carry/tcache/* | tar xz -C $TRITON_CACHE_DIR
LOG=$OUT/log.txt
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $LOG
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $LOG
TUNE="python3 tools/tune_kernels.py"
SWEEP=""  # the sweep's command, if this call sweeps
[ "$1" = "tune" ] && SWEEP="$TUNE"
[ "$1" = "sweep" ] && SWEEP="$TUNE --sequences --tokens 16 256 4096 32768 --name kernels_sequences_h200 ${*:2}"
[ "$1" = "tiles" ] && SWEEP="$TUNE --tokens 256 32768 --name kernels_tiles_h200 ${*:2}"
# the sweep's and the benchmark's kernels compile (12 processes) while the tests run; the timing runs load them
( [ -n "$SWEEP" ] && timeout 240 $SWEEP --compile-only --jobs 12
  [ "$1" = "tune" ] || timeout 120 $TUNE --compile-only --shipped --jobs 12 ) >> $LOG 2>&1 &
COMPILING=$!
START=$SECONDS
timeout 170 python3 -m pytest -v $(python3 -c "import xdist" 2>/dev/null && printf -- '-n 8') tests/kernels \
  -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -4
echo "tests: $((SECONDS - START)) s" | tee -a $LOG
wait $COMPILING
# which atomics this Triton emitted for the kernels (vector reductions or one element per instruction)
grep -rhoE "(red|atom)\.global[.a-z0-9_]*" $TRITON_CACHE_DIR --include=*.ptx | sort | uniq -c | tee -a $LOG
echo "compile: $((SECONDS - START)) s" | tee -a $LOG
if [ -n "$SWEEP" ]; then
  timeout 240 $SWEEP -o $OUT 2>&1 | tee -a $LOG | grep -v "^{" | tail -12
  echo "sweep: $((SECONDS - START)) s" | tee -a $LOG
fi
if [ "$1" = "tune" ]; then
  tar czf - -C $TRITON_CACHE_DIR . | split -b 15M - $OUT/triton_cache.tgz. && ls -la $OUT
else
  SWEPT=$(ls $OUT/kernels_sequences_h200_picks.json $OUT/kernels_tiles_h200_picks.json 2>/dev/null)
  CONFIGS=$([ -n "$SWEPT" ] && echo "--configs $SWEPT")
  timeout 200 python3 -m moexport.bench kernels -o $OUT --name kernels_h200 $CONFIGS 2>&1 | tail -3
  sed -n '/| shape/,/^$/p' $OUT/kernels_h200.md 2>/dev/null
fi
echo "total: $((SECONDS - START)) s" | tee -a $LOG
