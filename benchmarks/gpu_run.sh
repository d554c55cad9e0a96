#!/usr/bin/env bash
# Everything a GPU session needs in one call, on the lent GPU machine (see README, "GPU runs"):
# build the extension for Hopper, print the environment, run the whole test suite with CUDA
# present, then time the logits path. Results land under $OUT (default benchmarks/results/latest).
#
#   bash benchmarks/gpu_run.sh            # on the GPU machine, from the repository root
set -uo pipefail
OUT=${OUT:-benchmarks/results/latest}
mkdir -p "$OUT"
export DPO_KERNELS_CUDA=1 DPO_KERNELS_CUDA_ARCHS=${DPO_KERNELS_CUDA_ARCHS:-90}

echo "== build"
if ! pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  tail -n 60 "$OUT/build.log"
  exit 1
fi
echo "== environment"
{ nvidia-smi; python -m dpo_kernels.info; } 2>&1 | tee "$OUT/environment.txt"
echo "== tests"
python -m pytest python_tests -q -ra --junitxml="$OUT/tests.xml" > "$OUT/tests.txt" 2>&1
tests_rc=$?
tail -n 40 "$OUT/tests.txt"
echo "== logits path"
python benchmarks/gpu_logits_path.py --tokens 16384 --vocab 128256 --dtype bfloat16 \
  --out "$OUT/logits_path_bf16.json" 2>&1 | tee "$OUT/logits_path_bf16.txt"
exit $tests_rc
