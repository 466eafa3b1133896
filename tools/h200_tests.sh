#!/bin/bash
# One GPU call for every GPU test at once (correctness only: nothing is timed, so the suites share the GPU
# and the CPU cores): the kernels' tests (real kernels for every CPU test too, the AOT cubins carried from
# the CPU machine), the ONNX Runtime library on the CUDA provider (tests/plugins, marked gpu), the TensorRT
# plugins' runtime half (tests/trt_plugins, marked gpu) and the 1024-case differential sweep
# (tests/tools/test_sweep.py, marked gpu; every GPU implementation must run on every case).
# Results in $OUT: summary.txt (versions, each suite's verdict and time, the sweep's counts), pytest_<suite>.log,
# sweep_gpu.jsonl (one record per case; a failure's record holds the command that replays it).
# Carried (ignored paths), as the suites run need them (each suite names what it misses): .whl (onnx-graphsurgeon
# and polygraphy wheels, which `import moexport` needs), .gpu (onnxruntime-gpu for sm_90: `python3
# ../shared/gpu/ort_gpu_bundle.py --out .gpu`; ort, sweep), .carry/aot (cubins built here by `python
# tests/kernels/test_aot.py .carry/aot`; kernels) and the libraries `python setup.py build_ext --inplace` builds:
# moexport/plugins/libmoexport_ort.so (ort, sweep), moexport/trt_plugins/libmoexport_trt.so and
# libmoexport_trt_harness.so (trt, sweep).
# Usage (device run): bash tools/h200_tests.sh [seconds each suite may take; default 520] [suite ...]
#   suites: kernels ort trt sweep (default: all four), and memcheck: the tests SANITIZE_TESTS names
#   (default: the float32 fused LM on ONNX Runtime's CUDA provider, which faulted once) under
#   compute-sanitizer, which names the kernel and address of a bad access (log: pytest_memcheck.log).
#   KERNEL_TESTS narrows the kernels suite (default tests/kernels), e.g.
#   KERNEL_TESTS="tests/kernels/test_onnx_plans.py tests/kernels/test_aot.py".
LIMIT=${1:-520}
SUITES=${*:2}
SUITES=${SUITES:-kernels ort trt sweep}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
ORT_BUNDLE=.gpu/onnxruntime_gpu_sm90.tar.xz
[ -f $ORT_BUNDLE ] && python3 .gpu/ort_gpu_bundle.py --unpack $ORT_BUNDLE > /dev/null  # into /tmp/ortgpu
export PYTHONPATH=$PWD:/tmp/ortgpu:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
# one cache of built kernel bundles for every suite: a configuration is compiled once
export MOEXPORT_CACHE_DIR=/tmp/moexport-bundles
export MOEXPORT_AOT_DIR=$PWD/.carry/aot MOEXPORT_SWEEP_RESULTS=/tmp/sweep MOEXPORT_SWEEP_REQUIRE=triton,aot,ort_cuda,trt
SUMMARY=$OUT/summary.txt
ORT_LIB=moexport/plugins/libmoexport_ort.so
TRT_LIBS="moexport/trt_plugins/libmoexport_trt.so moexport/trt_plugins/libmoexport_trt_harness.so"
for name in $SUITES; do
  case $name in
    kernels) needs=.carry/aot/moe_16.json ;;
    ort) needs="$ORT_BUNDLE $ORT_LIB" ;;
    trt) needs=$TRT_LIBS ;;
    sweep) needs="$ORT_BUNDLE $ORT_LIB $TRT_LIBS" ;;
    memcheck) needs="$ORT_BUNDLE $ORT_LIB" ;;
    *) needs= ;;
  esac
  for file in $needs; do
    [ -f "$file" ] || echo "$name: $file is missing: build it here and carry it (see the header)" | tee -a $SUMMARY
  done
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a $SUMMARY
python3 -c "import torch, triton, onnxruntime as o; print('torch', torch.__version__, 'triton', triton.__version__,
  'onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a $SUMMARY
XDIST=$(python3 -c "import xdist" 2>/dev/null && echo yes)
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
suite() {  # name, processes (0: one, under compute-sanitizer), pytest arguments...
  local name=$1 jobs=$2 start=$SECONDS wrap=
  shift 2
  if [ "$jobs" = 0 ]; then
    [ -n "$SANITIZER" ] || { echo "$name: no compute-sanitizer on this machine" >> $SUMMARY; return; }
    wrap="$SANITIZER --tool memcheck --print-limit 5"
    jobs=
  fi
  # -v names each test as it ends (a suite cut by its time limit leaves no summary); faulthandler dumps the
  # stacks of a test still running after 150 s (one hung until the limit once, unnamed)
  timeout $LIMIT $wrap python3 -m pytest -v -rfE -p no:cacheprovider --durations=5 -o faulthandler_timeout=150 \
    ${XDIST:+${jobs:+-n $jobs}} "$@" > $OUT/pytest_$name.log 2>&1
  echo "$name: exit $?, $((SECONDS - start)) s: $(tail -1 $OUT/pytest_$name.log)" >> $SUMMARY
  grep -cE "PASSED|FAILED|ERROR|SKIPPED" $OUT/pytest_$name.log | sed "s/^/  $name: tests reported /" >> $SUMMARY
}
for name in $SUITES; do
  case $name in
    kernels) suite kernels 3 ${KERNEL_TESTS:-tests/kernels} & ;;
    ort) suite ort 5 -m gpu tests/plugins & ;;
    trt) suite trt 4 -m gpu tests/trt_plugins & ;;
    sweep) suite sweep 7 -m gpu tests/tools/test_sweep.py & ;;
    memcheck) suite memcheck 0 -m gpu ${SANITIZE_TESTS:-tests/plugins/test_ort_gpu.py -k "fused_lm and float32"} & ;;
    *) echo "unknown suite $name (kernels, ort, trt, sweep, memcheck)" | tee -a $SUMMARY ;;
  esac
done
wait
if [[ " $SUITES " == *" sweep "* ]]; then
  cat /tmp/sweep/*.jsonl > $OUT/sweep_gpu.jsonl 2>/dev/null
  python3 tools/sweep.py --summarize $OUT/sweep_gpu.jsonl >> $SUMMARY 2>&1
fi
cat $SUMMARY
