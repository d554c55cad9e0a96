#!/usr/bin/env bash
# A whole GPU session in one call, on a CUDA machine without a package registry, in about ten minutes:
# install the project (CUDA kernels for sm_90), install peer wheels from wheels/ when there are any,
# print the environment, run the GPU tests, run the GPU benchmark suite (one JSON per file), and turn
# the results into a markdown table and plots. Everything lands under $OUT.
#
#   OUT=/tmp/gpu-results bash benchmarks/gpu_run.sh      # from the repository root
#
# Every step runs under its own time limit (seconds, overridable: LIMIT_INSTALL=300 ...; the defaults
# add up to 600), and a failing or timed-out step does not stop the ones after it; the summary at the
# end lists each step's exit status, and the script exits non-zero when any step failed. pytest steps
# are stopped with SIGINT, so a benchmark run cut short still writes the JSON of the rows it finished
# (each grid's centre comes first). SKIP="gpu-tests install" skips steps by name, to split a session
# over several calls.
set -uo pipefail

OUT=${OUT:-benchmarks/results/gpu-$(date +%Y-%m-%d)}
PY=${PYTHON:-python}
DATE=$(date +%Y-%m-%d)
mkdir -p "$OUT"
export OUT PY
export DPO_KERNELS_CUDA=1 DPO_KERNELS_CUDA_ARCHS=${DPO_KERNELS_CUDA_ARCHS:-90}
export DPO_BENCH_DEVICE=cuda

STEPS=()
STATUS=()

# step NAME LIMIT_SECONDS COMMAND...: runs COMMAND (a program or a function of this script) with a
# time limit, its output to the terminal and to $OUT/NAME.log
step() {
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  if [[ " ${SKIP:-} " == *" $name "* ]]; then
    echo "== $name: skipped (SKIP)"
    return
  fi
  echo "== $name (limit ${limit}s)"
  timeout --signal=INT --kill-after=30 "$limit" bash -c '"$@"' step "$@" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "== $name: stopped at its ${limit}s limit"
  echo "== $name: exit $rc after $((SECONDS - start))s"
  STEPS+=("$name")
  STATUS+=("$rc")
}

install_project() {
  "$PY" -m pip install --no-build-isolation --no-deps -e . > "$OUT/build-output.log" 2>&1
  local rc=$?
  tail -n 40 "$OUT/build-output.log"
  return $rc
}

install_peer_wheels() {
  shopt -s nullglob
  local wheels=(wheels/*.whl)
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels/*.whl: peers that are not installed are skipped by the benchmarks"
    return 0
  fi
  "$PY" -m pip install --no-index --no-deps "${wheels[@]}"
}

environment() {
  nvidia-smi
  "$PY" -m dpo_kernels.info
  "$PY" -m pip list 2>/dev/null | grep -iE "^(torch|triton|trl|liger|cut.cross|transformers|pytest)" || true
}

export -f install_project install_peer_wheels environment

step install "${LIMIT_INSTALL:-240}" install_project
step peer-wheels "${LIMIT_WHEELS:-30}" install_peer_wheels
step environment "${LIMIT_ENVIRONMENT:-20}" environment
step gpu-tests "${LIMIT_TESTS:-90}" "$PY" -m pytest python_tests -m gpu -q -ra -p no:cacheprovider \
  --junitxml="$OUT/gpu-tests.xml"
step bench-logits "${LIMIT_BENCH_LOGITS:-80}" "$PY" -m pytest benchmarks/test_logits_path.py -q \
  -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/gpu-$DATE-logits.json"
step bench-linear "${LIMIT_BENCH_LINEAR:-120}" "$PY" -m pytest benchmarks/test_linear_dpo_loss.py -q \
  -p no:cacheprovider --benchmark-only --benchmark-json="$OUT/gpu-$DATE-linear.json"

results=()
for f in "$OUT/gpu-$DATE-logits.json" "$OUT/gpu-$DATE-linear.json"; do
  [ -s "$f" ] && results+=("$f")
done
if [ ${#results[@]} -gt 0 ]; then
  step report "${LIMIT_REPORT:-20}" "$PY" benchmarks/report.py "${results[@]}" --name "gpu-$DATE" --out-dir "$OUT"
else
  echo "== report: no benchmark JSON to report on"
  STEPS+=(report)
  STATUS+=(1)
fi

echo "== summary (results in $OUT)"
failed=0
for i in "${!STEPS[@]}"; do
  printf '%-14s exit %s\n' "${STEPS[$i]}" "${STATUS[$i]}"
  [ "${STATUS[$i]}" -ne 0 ] && failed=1
done
exit $failed
