#!/bin/bash
# One H200 call for the TensorRT plugins (no TensorRT runs there: the plugins are called as TensorRT calls
# them, through moexport/trt_plugins/harness.py): the tests of tests/trt_plugins (the GPU ones: every op,
# dtype and T from 1 to 32768 against PyTorch and the op set's reference, empty calls, a CUDA graph of
# enqueue), then `moexport bench trt-plugin` (the plugin against the PyTorch kernel path). Logs and results
# go to $OUT: log.txt, pytest_trt.log, trt_plugin_h200.{md,json,png}.
# Usage (device run, from the repository root): bash tools/h200_trt.sh
# Carried (ignored paths): .whl (onnx-graphsurgeon and polygraphy wheels, which `import moexport` needs),
# and the libraries built on the CPU machine by `python setup.py build_ext --inplace`:
# moexport/trt_plugins/libmoexport_trt.so and moexport/trt_plugins/libmoexport_trt_harness.so.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton_cache
LOG=$OUT/log.txt
for library in moexport/trt_plugins/libmoexport_trt.so moexport/trt_plugins/libmoexport_trt_harness.so; do
  if [ ! -f "$library" ]; then
    echo "$library is missing: build it with python setup.py build_ext --inplace and carry it" | tee -a $LOG
    exit 1
  fi
done
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $LOG
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $LOG
START=$SECONDS
timeout 330 python3 -m pytest -v -p no:cacheprovider tests/trt_plugins 2>&1 | tee $OUT/pytest_trt.log | tail -4
echo "tests: $((SECONDS - START)) s" | tee -a $LOG
timeout 220 python3 -m moexport.bench trt-plugin -o $OUT --name trt_plugin_h200 2>&1 | tail -3
sed -n '/| shape/,/^$/p' $OUT/trt_plugin_h200.md 2>/dev/null | tee -a $LOG
echo "total: $((SECONDS - START)) s" | tee -a $LOG
