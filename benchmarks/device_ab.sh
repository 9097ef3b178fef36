#!/usr/bin/env bash
# A/B of two trees on one GPU machine in one call: the checkout it runs in (A) and a second tree
# (B, e.g. a branch unpacked with `git archive BRANCH | tar -x -C .wheels/next`), each built in
# place, B's GPU tests run, then the same benchmarks on both; logs and records under $OUT/a, $OUT/b.
#
#   bash benchmarks/device_ab.sh B_DIR[,B_DIR2...] [--tests "PYTEST ARGS"] [--bench "SCRIPT ARGS"]... [--aba]
#
# Several B trees (comma-separated) run one after the other, each built, tested and benchmarked,
# under $OUT/b, $OUT/b2, ...; VMAMBAX_COMMIT_B lists their commits the same way.
#
# --aba runs A's benchmarks once more after B's (records under $OUT/a2): the first model benchmark
# of a call has come out slower than later ones, so A-then-B alone can favour B.
#
# VMAMBAX_COMMIT_A / VMAMBAX_COMMIT_B name the commits in the records (the trees travel without
# a usable .git). Other settings (TEST_TIMEOUT, BENCH_TIMEOUT, MAX_JOBS) pass to device_run.sh.
set -o pipefail
IFS=, read -r -a B_DIRS <<< "$1"; shift
IFS=, read -r -a B_COMMITS <<< "${VMAMBAX_COMMIT_B:-}"
for d in "${B_DIRS[@]}"; do [ -d "$d" ] || { echo "device_ab.sh: no tree at $d"; exit 2; }; done
TESTS=""; BENCH_ARGS=(); ABA=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=$2; shift 2 ;;
    --bench) BENCH_ARGS+=(--bench "$2"); shift 2 ;;
    --aba) ABA=1; shift ;;
    *) echo "device_ab.sh: unknown argument $1"; exit 2 ;;
  esac
done
[ ${#BENCH_ARGS[@]} -eq 0 ] && BENCH_ARGS=(--no-bench)
ROOT_OUT=${OUT:-/tmp/vmambax-out}
A_DIR=$(pwd)

echo "== A: $A_DIR"
OUT=$ROOT_OUT/a VMAMBAX_COMMIT=${VMAMBAX_COMMIT_A:-A} bash benchmarks/device_run.sh --mamba --no-tests "${BENCH_ARGS[@]}"
for j in "${!B_DIRS[@]}"; do
  B_DIR=$(cd "$A_DIR" && cd "${B_DIRS[$j]}" && pwd)
  sub=b$([ "$j" -gt 0 ] && echo $((j + 1)))
  label=${B_COMMITS[$j]:-B$((j + 1))}
  [ -d "$A_DIR/.wheels" ] && [ ! -e "$B_DIR/.wheels" ] && ln -s "$A_DIR/.wheels" "$B_DIR/.wheels"  # the peer's wheel
  echo "== B ($sub, $label): $B_DIR"
  cd "$B_DIR" || exit 2
  if [ -n "$TESTS" ]; then
    OUT=$ROOT_OUT/$sub VMAMBAX_COMMIT=$label bash benchmarks/device_run.sh --tests "$TESTS" "${BENCH_ARGS[@]}"
  else
    OUT=$ROOT_OUT/$sub VMAMBAX_COMMIT=$label bash benchmarks/device_run.sh --no-tests "${BENCH_ARGS[@]}"
  fi
  cd "$A_DIR" || exit 2
done
if [ "$ABA" = 1 ] && [ "${BENCH_ARGS[0]}" != "--no-bench" ]; then
  echo "== A again: $A_DIR"
  OUT=$ROOT_OUT/a2 VMAMBAX_COMMIT=${VMAMBAX_COMMIT_A:-A} bash benchmarks/device_run.sh --no-build --no-tests "${BENCH_ARGS[@]}"
fi
