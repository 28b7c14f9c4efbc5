#!/usr/bin/env bash
# On a GPU machine: build with the CUDA backend, run the whole test suite (CUDA cases included)
# and compute-sanitizer on a small forward+backward; write the summaries under $OUT (default
# benchmarks/results/gpu). Meant for the project's lent H100 (torch 2.11+cu130, nvcc 13.0).
# PYTEST_WORKERS=N spreads the suite over N processes with pytest-xdist where it is installed; the
# suite is stopped with SIGINT after TEST_TIMEOUT_S (pytest then still prints its summary).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
PYTHON=${PYTHON:-$(command -v python || command -v python3)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/device.txt" 2>&1
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$OUT/device.txt"
start=$SECONDS
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} BNEXT_CUDA=1 \
  "$PYTHON" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.txt" 2>&1 || { tail -80 "$OUT/build.txt"; exit 1; }
echo "build: $((SECONDS - start)) s"
workers=()
if [ -n "${PYTEST_WORKERS:-}" ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
  workers=(-n "$PYTEST_WORKERS")
  # Each worker's torch would start one OpenMP thread per core. On the H100 machine (16 cores),
  # 14 workers ran the CPU tests past a 120 s limit that way, and in 86 s with 2 threads each.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
fi
start=$SECONDS
timeout -s INT "${TEST_TIMEOUT_S:-400}" "$PYTHON" -m pytest -q -rfEs "${workers[@]}" tests > "$OUT/tests.txt" 2>&1; tests_rc=$?
echo "tests: $((SECONDS - start)) s, rc $tests_rc"
for tool in memcheck racecheck; do
  start=$SECONDS
  timeout "${SANITIZER_TIMEOUT_S:-200}" compute-sanitizer --tool "$tool" "$PYTHON" tests/cuda_sanitizer_case.py \
    > "$OUT/sanitizer_$tool.txt" 2>&1; rc=$?
  echo "$tool: $((SECONDS - start)) s, rc $rc"
done
grep -E "passed|failed|error" "$OUT/tests.txt" | tail -3
for f in "$OUT"/sanitizer_*.txt; do tail -n 2 "$f"; done
exit $tests_rc
