#!/bin/bash
# One H200 call for the TensorRT plugins (no TensorRT runs there: the plugins are called as TensorRT calls
# them, through moexport/trt_plugins/harness.py): the GPU tests of tests/trt_plugins (every op, dtype and T
# from 1 to 32768 against PyTorch and the op set's reference, empty calls, a CUDA graph of enqueue; run by
# tools/h200_tests.sh), then `moexport bench trt-plugin` (the plugin against the PyTorch kernel
# path). Logs and results go to $OUT: summary.txt, pytest_trt.log,
# trt_plugin_h200.{md,json,png}.
# Usage (device run, from the repository root): bash tools/h200_trt.sh
# Carried (ignored paths): .whl (onnx-graphsurgeon and polygraphy wheels, which `import moexport` needs),
# and the libraries built on the CPU machine by `python setup.py build_ext --inplace`:
# moexport/trt_plugins/libmoexport_trt.so and moexport/trt_plugins/libmoexport_trt_harness.so.
START=$SECONDS
bash tools/h200_tests.sh 330 trt
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
timeout 220 python3 -m moexport.bench trt-plugin -o $OUT --name trt_plugin_h200 2>&1 | tail -3
sed -n '/| shape/,/^$/p' $OUT/trt_plugin_h200.md 2>/dev/null | tee -a $OUT/summary.txt
echo "total: $((SECONDS - START)) s" | tee -a $OUT/summary.txt
