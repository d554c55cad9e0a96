#!/usr/bin/env bash
# shellcheck disable=SC2329  # the step functions are invoked by name, from the plans below
# A GPU session in two calls that fit 15 minutes of device time, the machine's start included
# (benchmarks/GPU.md says how to run them and what to commit). From the repository root:
#
#   OUT=/tmp/out bash benchmarks/gpu_run.sh a   # 350 s: build for sm_90, GPU tests, compute-sanitizer,
#                                               #   ceilings, the centre shape of both benchmark paths
#   OUT=/tmp/out bash benchmarks/gpu_run.sh b   # 310 s: the end-to-end DPO step (ours vs TRL), the rest
#                                               #   of the benchmark grid
#
# Budget by construction: each call has a budget (BUDGET, seconds; defaults above) and a plan of steps,
# each with a cap; the caps of a plan sum to the budget less RESERVE (the summary and bundling at the
# end): the benchmark steps of each plan share what the other caps leave. The clock starts when the
# script does. A step starts only if what remains covers its minimum, and runs under min(its cap, what
# remains - GRACE): stopped with SIGINT at that limit (pytest then still writes the JSON of the rows
# it finished; each grid's centre runs first) and killed GRACE seconds later. So no call outlasts its
# budget, whatever its steps do. The plan, with every limit, is printed first (and kept as plan.txt).
#
# Output: everything a call produces (logs, JSON, junit XML, report) goes to RUN_DIR (default a fresh
# folder under /tmp) and is bundled after every step into $OUT/gpu-run-<part>.tar.gz, with the summary
# in $OUT/gpu-run-<part>-summary.txt, so a call stopped from outside keeps what it finished. Call a
# also leaves the extension it built in gpu-build/ (git-ignored) and in $OUT (_C.*.so and
# sources.sha256): call b uses it instead of building while sources, Python and torch are unchanged
# (on a fresh machine: put the two files from $OUT in gpu-build/ and carry it).
#
# Settings (environment): SKIP="name ..." skips steps, ONLY="name ..." runs only those; CAPS="name=s ..."
# overrides caps (the printed plan then shows the new sum); PYTHON (default python3); BUDGET, RESERVE,
# GRACE; GPU_TEST_WORKERS (pytest-xdist workers for the GPU tests, default 4, 0 for none); E2E_ARGS
# (more options of benchmarks/end_to_end_dpo_step.py). A rehearsal on CPU: DPO_BENCH_DEVICE=cpu
# DPO_BENCH_SMOKE=1 E2E_ARGS="--device cpu --hidden 32 ..." with ONLY= the steps that need no GPU.
# DRY_RUN=1 runs the step machinery with every command replaced by `sleep DRY_STEP_SECONDS` (default 0):
# the budget arithmetic, limits, time-outs, skips, summary and bundle, without a GPU.
#
# Exit status: 0 when every step that ran succeeded (skipped steps do not count), 1 otherwise; 2 for a
# usage error.
set -uo pipefail
START=$SECONDS

PART=${1:-}
case $PART in
  a) BUDGET=${BUDGET:-350} ;;
  b) BUDGET=${BUDGET:-310} ;;
  *) echo "usage: OUT=DIR bash benchmarks/gpu_run.sh a|b   (see the comment at the top)" >&2; exit 2 ;;
esac
if [ ! -f benchmarks/gpu_run.sh ]; then
  echo "gpu_run.sh: run it from the repository root" >&2
  exit 2
fi
RESERVE=${RESERVE:-10}
GRACE=${GRACE:-5}
DATE=$(date +%Y-%m-%d)
OUT=${OUT:-benchmarks/results/gpu-$DATE}
RUN_DIR=${RUN_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/dpo-kernels-gpu-run-$PART.XXXXXX")}
PY=${PYTHON:-python3}
DRY_RUN=${DRY_RUN:-0}
mkdir -p "$OUT" "$RUN_DIR"
OUT=$(cd "$OUT" && pwd)
RUN_DIR=$(cd "$RUN_DIR" && pwd)
export OUT RUN_DIR PY DATE PART
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DPO_KERNELS_CUDA=1 DPO_KERNELS_CUDA_ARCHS=${DPO_KERNELS_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-$(nproc)}
if [ -d /usr/local/cuda/bin ] && [[ ":$PATH:" != *:/usr/local/cuda/bin:* ]]; then  # nvcc, compute-sanitizer
  export PATH="$PATH:/usr/local/cuda/bin"
fi
export DPO_BENCH_DEVICE=${DPO_BENCH_DEVICE:-cuda}  # cpu (with DPO_BENCH_SMOKE=1): a rehearsal on CPU

# -- the steps (each a function run under `timeout`; output goes to $RUN_DIR/<step>.log) -----------

# exit status of a step that cannot run on this machine (a tool is missing): reported as skipped
CANNOT_RUN=99

source_hash() {  # what the extension is built from: sources, build files, Python and torch
  {
    "$PY" -c 'import sys, torch; print(sys.version, torch.__version__, torch.version.cuda)'
    find csrc CMakeLists.txt setup.py -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -d' ' -f1
}

carried_build_matches() {
  compgen -G "gpu-build/_C.*.so" > /dev/null && [ "$(cat gpu-build/sources.sha256 2> /dev/null)" = "$(source_hash)" ]
}

install_project() {
  if carried_build_matches; then
    cp gpu-build/_C.*.so dpo_kernels/ && echo "using the extension from gpu-build/ (built from these sources)"
  else
    "$PY" -m pip install --no-build-isolation --no-deps -e . > "$RUN_DIR/build-output.log" 2>&1
    local rc=$?
    tail -n 40 "$RUN_DIR/build-output.log"
    [ "$rc" -eq 0 ] || return "$rc"
  fi
  local so
  so=$("$PY" -c '
from dpo_kernels.backends import extension
info = extension.build_info()
assert info.get("cuda") and "90" in info.get("cuda_archs", ""), f"not a CUDA build for sm_90: {info or extension.load_error()}"
import dpo_kernels._C as C
print(C.__file__)') || return 1
  echo "extension: $so"
  if [ "$PART" = a ]; then  # for call b: here in gpu-build/ (a warm machine), and in $OUT (a fresh one)
    mkdir -p gpu-build && cp "$so" gpu-build/ && source_hash > gpu-build/sources.sha256 \
      && cp gpu-build/* "$OUT/"
  fi
}

install_peer_wheels() {
  local wheels=()
  mapfile -t wheels < <(compgen -G "wheels/*.whl")
  if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels/*.whl: the benchmarks skip the peers that are not installed; the end-to-end step, TRL"
    return 0
  fi
  "$PY" -m pip install --no-index --no-deps --no-cache-dir "${wheels[@]}" || return
  "$PY" -m pip check 2>&1 | grep -iE "^(trl|datasets|liger|cut-cross|multiprocess|dill) " \
    || echo "pip check: nothing missing for the wheels' packages"
}

environment() {
  nvidia-smi
  "$PY" -m dpo_kernels.info
  "$PY" -m pip list 2> /dev/null | grep -iE "^(torch|triton|trl|liger|cut.cross|transformers|datasets|accelerate|pytest)" || true
  command -v compute-sanitizer || echo "compute-sanitizer: not on PATH"
  nvcc --version | tail -n 2 || true
}

gpu_tests() {
  local workers=()
  if [ "${GPU_TEST_WORKERS:-4}" != 0 ] && "$PY" -c "import xdist" 2> /dev/null; then
    workers=(-n "${GPU_TEST_WORKERS:-4}")
  fi
  "$PY" -m pytest python_tests -m gpu -q -ra -p no:cacheprovider "${workers[@]}" --durations=15 \
    --junitxml="$RUN_DIR/gpu-tests.xml"
}

sanitizer() {  # sanitizer TOOL: the CUDA kernels once each, on small shapes, under compute-sanitizer
  local tool=$1 sanitizer_bin
  sanitizer_bin=$(command -v compute-sanitizer)
  if [ -z "$sanitizer_bin" ]; then
    echo "compute-sanitizer not found (PATH, /usr/local/cuda/bin): the $tool check is skipped"
    return "$CANNOT_RUN"
  fi
  # one cudaMalloc per tensor, so that memcheck sees an access past a tensor's end
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer_bin" --tool "$tool" --error-exitcode 1 --print-limit 50 \
    "$PY" benchmarks/cuda_sanitizer_driver.py --backend cuda --device cuda
}
sanitizer_memcheck() { sanitizer memcheck; }
sanitizer_racecheck() { sanitizer racecheck; }

ceilings() {
  "$PY" benchmarks/ceilings.py --out "$RUN_DIR/ceilings.json"
}

bench() {  # bench PATH POINTS: one benchmark file at the grid points DPO_BENCH_POINTS selects
  local file=$1 points=$2
  DPO_BENCH_POINTS=$points "$PY" -m pytest "benchmarks/test_$file.py" -q -p no:cacheprovider --benchmark-only \
    --benchmark-json="$RUN_DIR/gpu-$DATE-$points-$file.json"
}
bench_centre_logits() { bench logits_path centre; }
bench_centre_linear() { bench linear_dpo_loss centre; }
bench_rest_logits() { bench logits_path rest; }
bench_rest_linear() { bench linear_dpo_loss rest; }

end_to_end() {  # the 1B Llama DPO step through both trainers; its searches stop 30 s before the limit
  local extra=()
  read -r -a extra <<< "${E2E_ARGS:-}"  # more options of the script, e.g. "--seq-len 8192"
  "$PY" benchmarks/end_to_end_dpo_step.py --device cuda --out "$RUN_DIR/end-to-end-dpo-step.json" \
    --time-limit $((STEP_LIMIT > 60 ? STEP_LIMIT - 30 : STEP_LIMIT / 2)) "${extra[@]}"
}

report() {
  local results=()
  mapfile -t results < <(compgen -G "$RUN_DIR/gpu-$DATE-*.json")
  if [ ${#results[@]} -eq 0 ]; then
    echo "no benchmark JSON to report on"
    return "$CANNOT_RUN"
  fi
  "$PY" benchmarks/report.py "${results[@]}" --name "gpu-$DATE-$PART" --out-dir "$RUN_DIR"
}

export CANNOT_RUN
export -f source_hash carried_build_matches install_project install_peer_wheels environment gpu_tests sanitizer \
  sanitizer_memcheck sanitizer_racecheck ceilings bench bench_centre_logits bench_centre_linear bench_rest_logits \
  bench_rest_linear end_to_end report

# -- the plans: "name cap min function" (seconds); the steps with cap "rest" share what the other caps
#    leave of BUDGET - RESERVE, so that the caps sum to the budget ----------------------------------

if [ "$PART" = a ]; then
  PLAN=(
    "install 80 40 install_project"
    "peer-wheels 10 5 install_peer_wheels"
    "environment 10 5 environment"
    "gpu-tests 90 30 gpu_tests"
    "sanitizer-memcheck 25 15 sanitizer_memcheck"
    "sanitizer-racecheck 25 15 sanitizer_racecheck"
    "ceilings 10 5 ceilings"
    "bench-centre-logits rest 20 bench_centre_logits"
    "bench-centre-linear rest 20 bench_centre_linear"
    "report 10 5 report"
  )
else
  install_cap=80  # a build; seconds when call a's build is carried in gpu-build/ (the rest to the grid)
  if [ "$DRY_RUN" != 1 ] && carried_build_matches; then install_cap=20; fi
  PLAN=(
    "install $install_cap 10 install_project"
    "peer-wheels 10 5 install_peer_wheels"
    "environment 10 5 environment"
    "end-to-end 150 60 end_to_end"
    "bench-rest-logits rest 20 bench_rest_logits"
    "bench-rest-linear rest 20 bench_rest_linear"
    "report 10 5 report"
  )
fi

cap_of() {  # cap_of NAME DEFAULT: the cap, or its CAPS override
  local entry
  for entry in ${CAPS:-}; do
    if [ "${entry%%=*}" = "$1" ]; then
      echo "${entry#*=}"
      return
    fi
  done
  echo "$2"
}

# -- the machinery ---------------------------------------------------------------------------------

NAMES=()
RESULTS=()
TIMES=()
LIMITS=()
FAILED=0
SUMMARY="$OUT/gpu-run-$PART-summary.txt"

left() { echo $((BUDGET - RESERVE - (SECONDS - START))); }

write_summary() {
  {
    echo "gpu_run.sh $PART: budget ${BUDGET}s, $((SECONDS - START))s used; results in gpu-run-$PART.tar.gz"
    printf '%-22s %-8s %-7s %s\n' step limit seconds result
    local i
    for i in "${!NAMES[@]}"; do
      printf '%-22s %-8s %-7s %s\n' "${NAMES[$i]}" "${LIMITS[$i]}" "${TIMES[$i]}" "${RESULTS[$i]}"
    done
  } > "$SUMMARY"
  cp "$SUMMARY" "$RUN_DIR/summary.txt"
}

bundle() {  # everything so far, replacing the previous bundle in one rename
  tar -czf "$OUT/gpu-run-$PART.tar.gz.partial" -C "$RUN_DIR" . && mv "$OUT/gpu-run-$PART.tar.gz.partial" "$OUT/gpu-run-$PART.tar.gz"
}

record() {  # record NAME LIMIT SECONDS RESULT
  NAMES+=("$1")
  LIMITS+=("$2")
  TIMES+=("$3")
  RESULTS+=("$4")
  write_summary
  bundle
}

listed() {  # listed NAME LIST
  [[ " $2 " == *" $1 "* ]]
}

step() {  # step NAME CAP MIN FUNCTION
  local name=$1 cap=$2 min=$3 fn=$4 began=$SECONDS remaining limit rc result
  if listed "$name" "${SKIP:-}" || { [ -n "${ONLY:-}" ] && ! listed "$name" "$ONLY"; }; then
    echo "== $name: skipped (SKIP/ONLY)"
    record "$name" - 0 "skipped (SKIP/ONLY)"
    return
  fi
  if [ "$cap" -lt 1 ]; then
    echo "== $name: skipped, the plan leaves it no time (cap 0s)"
    record "$name" - 0 "skipped: the plan leaves it no time (cap 0s)"
    return
  fi
  remaining=$(left)
  limit=$((cap < remaining - GRACE ? cap : remaining - GRACE))
  if [ "$limit" -lt "$min" ] || [ "$limit" -lt 1 ]; then  # (`timeout 0` would mean no limit)
    echo "== $name: skipped, ${remaining}s left (${GRACE}s of it grace), it needs ${min}s"
    record "$name" - 0 "skipped: ${remaining}s left (${GRACE}s of it grace), needs ${min}s"
    return
  fi
  echo "== $name (limit ${limit}s; ${remaining}s left)"
  if [ "$DRY_RUN" = 1 ]; then
    echo "dry run: $fn replaced by sleep ${DRY_STEP_SECONDS:-0}"
    fn="sleep ${DRY_STEP_SECONDS:-0}"
  fi
  # The output goes to the log, which is shown as it grows; not through a pipe, which a leftover
  # grandchild could hold open past the limit. timeout runs the step in a process group of its own:
  # what is left of that group when timeout returns is killed.
  : > "$RUN_DIR/$name.log"  # there before tail looks for it
  # shellcheck disable=SC2086  # fn is a function name, or the dry run's "sleep N"
  STEP_LIMIT=$limit timeout --signal=INT --kill-after="$GRACE" "$limit" bash -c '"$@"' step $fn \
    > "$RUN_DIR/$name.log" 2>&1 &
  local pid=$!
  tail -n +1 -s 0.2 -f --pid="$pid" "$RUN_DIR/$name.log"
  wait "$pid"
  rc=$?
  kill -KILL -- "-$pid" 2> /dev/null
  case $rc in
    0) result=ok ;;
    124 | 137) result="stopped at its ${limit}s limit (exit $rc)"; FAILED=1 ;;
    "$CANNOT_RUN") result="skipped: cannot run here (see $name.log)" ;;
    *) result="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "== $name: $result after $((SECONDS - began))s"
  record "$name" "${limit}s" $((SECONDS - began)) "$result"
}

resolved_plan() {  # the plan's lines: CAPS applied, the "rest" steps sharing what the other caps leave
  local entry name cap min fn fixed=0 shared=0 left_over seen=0  # (no minimum above its cap)
  for entry in "${PLAN[@]}"; do
    read -r name cap min fn <<< "$entry"
    cap=$(cap_of "$name" "$cap")
    if [ "$cap" = rest ]; then shared=$((shared + 1)); else fixed=$((fixed + cap)); fi
  done
  left_over=$((BUDGET - RESERVE - fixed > 0 ? BUDGET - RESERVE - fixed : 0))
  for entry in "${PLAN[@]}"; do
    read -r name cap min fn <<< "$entry"
    cap=$(cap_of "$name" "$cap")
    if [ "$cap" = rest ]; then  # equal shares, the last one taking the odd seconds
      seen=$((seen + 1))
      cap=$((seen < shared ? left_over / shared : left_over - (shared - 1) * (left_over / shared)))
    fi
    echo "$name $cap $((min < cap ? min : cap)) $fn"
  done
}

print_plan() {
  local total=0 name cap min fn
  echo "== plan of call $PART: budget ${BUDGET}s = steps + ${RESERVE}s reserve; a step runs under"
  echo "   min(cap, time left - ${GRACE}s) if that covers its minimum; results: $OUT (work: $RUN_DIR)"
  printf '   %-22s %5s %5s %s\n' step cap min "starts by (if every step before uses its cap)"
  while read -r name cap min fn; do
    printf '   %-22s %5s %5s %ss\n' "$name" "$cap" "$min" "$total"
    total=$((total + cap))
  done < <(resolved_plan)
  echo "   caps sum to ${total}s of the $((BUDGET - RESERVE))s for steps"
  if [ "$total" -gt $((BUDGET - RESERVE)) ]; then echo "   (over: the last steps get what is left, or are skipped)"; fi
  if [ "$DRY_RUN" = 1 ]; then echo "   DRY_RUN: every command is replaced by sleep ${DRY_STEP_SECONDS:-0}"; fi
}

print_plan | tee "$RUN_DIR/plan.txt"

mapfile -t STEPS < <(resolved_plan)
for entry in "${STEPS[@]}"; do
  read -r name cap min fn <<< "$entry"
  step "$name" "$cap" "$min" "$fn"
done

write_summary
bundle
echo "== summary of call $PART"
cat "$SUMMARY"
exit $FAILED
