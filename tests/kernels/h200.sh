#!/bin/bash
# One H200 call: GPU tests of the kernels (real kernels for every CPU test too, the AOT cubin path,
# cubins carried from the CPU machine), the `kernels` benchmark, and optionally the config sweep.
# Usage (device run): bash tests/kernels/h200.sh [tune]   -- writes logs and results under $OUT.
# .whl (carried): pure-Python packages that `import moexport` needs and the image lacks
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 MOEXPORT_AOT_DIR=$PWD/.carry/aot
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv | tee $OUT/gpu.txt
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" | tee -a $OUT/gpu.txt
timeout 150 python3 -m pytest -q tests/kernels -p no:cacheprovider 2>&1 | tee $OUT/pytest.log | tail -25
if [ "$1" = "tune" ]; then
  timeout 150 python3 -m moexport.bench kernels --tune --shapes WT103-big large -o $OUT 2>&1 | tail -5
fi
timeout 330 python3 -m moexport.bench kernels -o $OUT --name kernels_h200 2>&1 | tail -5
cat $OUT/kernels_h200.md 2>/dev/null | sed -n '/| shape/,$p'
