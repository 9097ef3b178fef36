#!/usr/bin/env bash
# One GPU session in one command: build the extension in place, run the GPU tests with the
# evidence plugin, optionally compute-sanitizer, then the benchmarks; logs and results go to $OUT.
#
#   bash benchmarks/device_run.sh [--archs 90] [--mamba] [--no-build]
#        [--tests "PYTEST ARGS" | --no-tests] [--k "PYTEST -k EXPRESSION"] [--sanitize] [--bench "SCRIPT ARGS" | --no-bench]
#
#   --mamba      pip install --no-deps the mamba-ssm wheel found in .wheels/ (the unfused peer)
#   --tests      pytest arguments (default: "-m gpu tests/ops"); the evidence plugin is always loaded
#   --sanitize   compute-sanitizer memcheck and racecheck on benchmarks/bench_ss2d.py --sanitize
#   --profile    Nsight Compute on the enc1 forward and backward kernels (ncu.txt) and a SASS
#                instruction census of the extension (sass.txt)
#   --bench      a benchmark script and its arguments (default: "benchmarks/bench_ss2d.py --quick");
#                repeat --bench to run several
# SANITIZE_CASES=enc1,odd limits the sanitizer pass to those cases (default: the whole shape set).
# PROFILE_KERNELS (an ncu -k regex), PROFILE_SKIP, PROFILE_COUNT override the profiled launches; e.g.
# with the carry passes: PROFILE_KERNELS="regex:ss2d_(fwd|bwd)_(chunk|carry|out|merge|main)" PROFILE_SKIP=4 PROFILE_COUNT=8.
# Time limits per step (seconds): TEST_TIMEOUT (300), SANITIZE_TIMEOUT (120 per tool), BENCH_TIMEOUT (300).
# Set VMAMBAX_COMMIT to the commit under test when the tree travels without .git.
# Files under $OUT: log.txt (everything), build.log, tests.log, sanitizer.log, evidence-<commit>.json, failures-live.txt (each failure as it happens),
# new-records.jsonl (only the records this run appended; append them to benchmarks/results/ locally).
set -o pipefail
OUT=${OUT:-/tmp/vmambax-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1

ARCHS=90; KEXPR=""; PROFILE=0; MAMBA=0; BUILD=1; SANITIZE=0; TESTS="-m gpu tests/ops"; BENCHES=()
while [ $# -gt 0 ]; do
  case "$1" in
    --archs) ARCHS=$2; shift 2 ;;
    --mamba) MAMBA=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --tests) TESTS=$2; shift 2 ;;
    --k) KEXPR=$2; shift 2 ;;
    --no-tests) TESTS=""; shift ;;
    --sanitize) SANITIZE=1; shift ;;
    --profile) PROFILE=1; shift ;;
    --bench) BENCHES+=("$2"); shift 2 ;;
    --no-bench) BENCHES=("none"); shift ;;
    *) echo "device_run.sh: unknown argument $1"; exit 2 ;;
  esac
done
[ ${#BENCHES[@]} -eq 0 ] && BENCHES=("benchmarks/bench_ss2d.py --quick")

echo "== device: $(nvidia-smi -L 2>/dev/null | head -1)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
nvcc --version | tail -1

if [ "$MAMBA" = 1 ]; then
  ls .wheels/mamba_ssm-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-deps --no-index .wheels/mamba_ssm-*.whl \
    || echo "== mamba-ssm wheel not installed (none in .wheels/ or pip failed): the peer will be unfused_torch"
fi

if [ "$BUILD" = 1 ]; then
  echo "== build (VMAMBAX_CUDA_ARCHS=$ARCHS)"
  start=$(date +%s)
  VMAMBAX_FORCE_BUILD=1 VMAMBAX_CUDA_ARCHS=$ARCHS MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  rc=$?
  echo "== build rc=$rc in $(( $(date +%s) - start )) s"
  grep -E "error|warning" "$OUT/build.log" | grep -v "^ninja" | head -40
  [ $rc -ne 0 ] && tail -60 "$OUT/build.log"
fi

RESULTS=$(python3 -c "import sys; sys.path.insert(0, '.'); from benchmarks.harness import results_path; print(results_path())")
BEFORE=$( [ -f "$RESULTS" ] && wc -l < "$RESULTS" || echo 0 )

if [ -n "$TESTS" ]; then
  echo "== pytest $TESTS"
  # Word-split with shell quoting, so that --tests "-k 'not triton' ..." keeps its expression whole
  # (split on blanks alone, pytest got "'not" and collected nothing).
  eval "TEST_ARGS=($TESTS)"
  # SIGINT at the limit: pytest stops as on Ctrl-C and still writes the evidence of what ran.
  VMAMBAX_EVIDENCE_DIR="$OUT" timeout --signal=INT --kill-after=30 "${TEST_TIMEOUT:-300}" python3 -m pytest -p benchmarks.gpu_evidence -q --timeout=900 ${KEXPR:+-k "$KEXPR"} "${TEST_ARGS[@]}" 2>&1 \
    | tee "$OUT/tests.log" | tail -40
  for f in "$OUT"/*.json; do [ -f "$f" ] && mv "$f" "$OUT/evidence-$(basename "$f")"; done
fi

if [ "$SANITIZE" = 1 ]; then
  for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool"
    timeout "${SANITIZE_TIMEOUT:-120}" compute-sanitizer --tool $tool --error-exitcode 9 python3 benchmarks/bench_ss2d.py --sanitize ${SANITIZE_CASES:+--cases $SANITIZE_CASES} 2>&1 \
      | tee -a "$OUT/sanitizer.log" | tail -8
    echo "== $tool rc=${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer.log"
  done
fi

if [ "$PROFILE" = 1 ]; then
  # after the warm-up forward's 3 (chunk + 2 output passes): the forward's chunk and output passes,
  # then the backward's chunk pass and its two main passes
  echo "== ncu (enc1 core bf16: the forward's and the backward's chunk and main kernels)"
  timeout "${PROFILE_TIMEOUT:-90}" ncu -k "${PROFILE_KERNELS:-regex:ss2d_(fwd|bwd)_(chunk|out|main)}" \
    --launch-skip "${PROFILE_SKIP:-3}" --launch-count "${PROFILE_COUNT:-6}" --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis --section SchedulerStats python3 benchmarks/bench_ss2d.py --profile > "$OUT/ncu.txt" 2>&1
  echo "== ncu rc=$? ($(wc -l < "$OUT/ncu.txt") lines)"
  so=$(ls vmambax_kernels/_C*.so | head -1)
  cuobjdump -sass "$so" | grep -oE "(ATOMS|ATOM|RED|MUFU|SHFL|LDL|STL|LDS|STS|LDG|STG)(\.[A-Z0-9_]+)*" \
    | sort | uniq -c | sort -rn > "$OUT/sass.txt"
  head -30 "$OUT/sass.txt"
fi

for b in "${BENCHES[@]}"; do
  [ "$b" = none ] && continue
  echo "== python3 $b"
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-300}" python3 $b
done

if [ -f "$RESULTS" ]; then
  tail -n +$((BEFORE + 1)) "$RESULTS" > "$OUT/new-records.jsonl"
  echo "== $(wc -l < "$OUT/new-records.jsonl") new records for $(basename "$RESULTS")"
fi
