#!/usr/bin/env bash
# On a GPU machine: build with the CUDA backend, run the whole test suite (CUDA cases included)
# and compute-sanitizer on a small forward+backward; write the summaries under $OUT (default
# benchmarks/results/gpu). Meant for the project's lent H100 (torch 2.11+cu130, nvcc 13.0).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/device.txt"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BNEXT_CUDA=1 \
  python -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1 || { tail -50 "$OUT/build.txt"; exit 1; }
python -m pytest -q -rs tests > "$OUT/tests.txt" 2>&1; tests_rc=$?
for tool in memcheck racecheck; do
  compute-sanitizer --tool "$tool" python tests/cuda_sanitizer_case.py > "$OUT/sanitizer_$tool.txt" 2>&1
done
tail -3 "$OUT/tests.txt"; tail -2 "$OUT"/sanitizer_*.txt
exit $tests_rc
