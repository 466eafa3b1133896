#!/bin/bash
# One H200 call: the GPU half of the differential sweep (tests/tools/test_sweep.py, tests marked gpu): 32 groups
# of 32 cases (1024), each case run by the PyTorch reference on the GPU, the Triton kernels (JIT), and the
# layer's kernel bundle through the CUDA driver (AOT), through libmoexport_ort on ONNX Runtime's CUDA provider
# and through the TensorRT plugins (libmoexport_trt, called as TensorRT calls it by the harness); all four must
# run on every case (MOEXPORT_SWEEP_REQUIRE). Results in $OUT: summary.txt (versions, pytest's verdict, counts
# per implementation), pytest.log, sweep_gpu.jsonl (one record per case; a failure's record holds the command
# that replays it).
# Carried (ignored paths): .whl (onnx-graphsurgeon, which `import moexport` needs; pytest-xdist + execnet for
# -n 8), .gpu (onnxruntime-gpu for sm_90: `python3 ../shared/gpu/ort_gpu_bundle.py --out .gpu`) and the
# libraries `python setup.py build_ext --inplace` builds: moexport/plugins/libmoexport_ort.so,
# moexport/trt_plugins/libmoexport_trt.so and moexport/trt_plugins/libmoexport_trt_harness.so.
# Usage (device run): bash tools/sweep_h200.sh [more pytest options, e.g. -k group7]
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 .gpu/ort_gpu_bundle.py --unpack .gpu/onnxruntime_gpu_sm90.tar.xz > /dev/null  # into /tmp/ortgpu
export PYTHONPATH=$PWD:/tmp/ortgpu:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
export MOEXPORT_SWEEP_RESULTS=/tmp/sweep MOEXPORT_SWEEP_REQUIRE=triton,aot,ort_cuda,trt
SUMMARY=$OUT/summary.txt
for library in moexport/plugins/libmoexport_ort.so moexport/trt_plugins/libmoexport_trt.so \
               moexport/trt_plugins/libmoexport_trt_harness.so; do
  [ -f "$library" ] || echo "$library is missing (python setup.py build_ext --inplace, and carry it)" | tee -a $SUMMARY
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $SUMMARY
python3 -c "import torch, triton, onnxruntime as o; print('torch', torch.__version__, 'triton', triton.__version__,
  'onnxruntime', o.__version__, o.get_available_providers())" 2>&1 | tee -a $SUMMARY
START=$SECONDS
timeout 480 python3 -m pytest -q -m gpu tests/tools/test_sweep.py -p no:cacheprovider --durations=5 \
  $(python3 -c "import xdist" 2>/dev/null && printf -- '-n 8') "$@" > $OUT/pytest.log 2>&1
STATUS=$?
tail -3 $OUT/pytest.log | tee -a $SUMMARY
echo "sweep: $((SECONDS - START)) s, pytest exit status $STATUS" | tee -a $SUMMARY
cat /tmp/sweep/*.jsonl > $OUT/sweep_gpu.jsonl 2>/dev/null
python3 tools/sweep.py --summarize $OUT/sweep_gpu.jsonl 2>&1 | tee -a $SUMMARY
exit $STATUS
