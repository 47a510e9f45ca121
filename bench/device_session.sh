#!/usr/bin/env bash
# Every H200 measurement fusec's open issues need, as two device calls (each under the 600 s limit).
#
# Run from the repository root on the device machine, after the prepare lines that
# ../shared/device/prepare.sh prints (carry [".whl", ".gl"]; EXTRA_WHEELS adds rich & co.):
#   bash bench/device_session.sh tests     # cuda-marked tests + flash attention (~3 min)
#   bash bench/device_session.sh harness   # norm harness (cuda + wgpu) + GEMV (~9 min)
#   bash bench/device_session.sh gemv      # the GEMV tests + the GEMV variant sweep alone (~4 min)
# Results go to $OUT (the device tool's folder) or bench/results/, named <date>-h200-*.
# Each step has its own timeout so one slow step cannot eat the others' results; a step's
# exit status is printed, never hidden.
set -uo pipefail
part=${1:?usage: bench/device_session.sh tests|harness|gemv}
out=${OUT:-bench/results}
day=$(date +%F)
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS CMD...: run CMD with a timeout, log to $out/$day-h200-NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s)"
  timeout "$limit" "$@" > "$out/$day-h200-$name.log" 2>&1
  echo "   exit $? ; last lines:"
  tail -n 6 "$out/$day-h200-$name.log" | sed 's/^/   /'
}

case $part in
  tests)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/$day-h200-gpu.txt" 2>&1
    step cuda-tests 240 python3 -m pytest -q -m cuda -p no:cacheprovider --continue-on-collection-errors -rfE
    step flash-attn 150 python3 bench/bench_flash_attn.py --all --flex --out "$out/$day-h200-flash-attn.json"
    step run-cuda 90 python3 -m fusec run --model smollm2-135m --backend cuda --tokens 4 --verify --stats
    ;;
  harness)
    step harness 400 python3 bench/harness.py --backend all -o "$out/$day-h200.json" --markdown "$out/BENCHMARKS.md"
    step gemv 200 python3 bench/bench_gemv.py --out "$out/$day-h200-gemv.json"
    ;;
  gemv)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/$day-h200-gpu.txt" 2>&1
    step gemv-tests 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rfE tests/test_gemv_kernels.py
    step gemv 300 python3 bench/bench_gemv.py --out "$out/$day-h200-gemv.json"
    ;;
  *)
    echo "unknown part '$part' (tests | harness | gemv)" >&2
    exit 2
    ;;
esac
