#!/usr/bin/env bash
# Source-level Nsight Compute profile of chosen launches (run on the GPU machine, extension built):
# the full section set with SASS-level counters, exported as CSV for reading offline.
#
#   bash benchmarks/ncu_source.sh NAME KERNEL_REGEX [SKIP [COUNT]] [-- COMMAND ...]
#
# Writes $OUT/NAME-sass.csv.gz (one row per SASS instruction: executed count, stall samples and
# their reasons), $OUT/NAME-cuda-sass.csv.gz (the same rows under the CUDA line each comes from, from
# the -lineinfo build), $OUT/NAME-details.csv.gz (the sections). COMMAND defaults to one enc1 core bf16 fwd+bwd (bench_ss2d.py --profile).
# Sort the SASS rows by "Warp Stall Sampling (All Samples)" or sum them per CUDA line.
set -o pipefail
NAME=$1; REGEX=$2; shift 2
SKIP=0; COUNT=1
[ $# -gt 0 ] && [ "$1" != "--" ] && { SKIP=$1; shift; }
[ $# -gt 0 ] && [ "$1" != "--" ] && { COUNT=$1; shift; }
[ "${1:-}" = "--" ] && shift
[ $# -eq 0 ] && set -- python3 benchmarks/bench_ss2d.py --profile
OUT=${OUT:-/tmp/vmambax-out}
mkdir -p "$OUT"
REP=$(mktemp -d)/$NAME
ncu --set full --import-source yes -k "regex:$REGEX" --launch-skip "$SKIP" --launch-count "$COUNT" \
  -o "$REP" "$@" > "$OUT/$NAME-ncu.log" 2>&1 || { echo "ncu failed:"; tail -20 "$OUT/$NAME-ncu.log"; exit 1; }
ncu --import "$REP.ncu-rep" --page source --print-source sass --csv | gzip > "$OUT/$NAME-sass.csv.gz"
ncu --import "$REP.ncu-rep" --page source --print-source cuda,sass --csv | gzip > "$OUT/$NAME-cuda-sass.csv.gz"
ncu --import "$REP.ncu-rep" --page details --csv | gzip > "$OUT/$NAME-details.csv.gz"
ls -la "$OUT"/"$NAME"-*
