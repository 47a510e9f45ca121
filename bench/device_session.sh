#!/usr/bin/env bash
# Every H200 measurement fusec's open issues need, as device calls (each under the 600 s limit).
#
# Run from the repository root on the device machine, after the prepare lines that
# ../shared/device/prepare.sh prints (carry [".whl", ".gl"]; EXTRA_WHEELS adds rich & co.):
#   bash bench/device_session.sh tests     # cuda-marked tests + flash attention (~3 min)
#   bash bench/device_session.sh harness   # norm harness (cuda + wgpu) + GEMV (~9 min)
#   bash bench/device_session.sh norm      # norm harness + candidate sweep: wgpu, then cuda (~8 min)
#   bash bench/device_session.sh gemv      # the GEMV tests, the GEMV variant sweep, the read/copy ceilings per size (~5 min)
# Results go to $OUT (the device tool's folder) or bench/results/, named <date>-h200-*.
# Each step has its own timeout so one slow step cannot eat the others' results; a step's
# exit status is printed, never hidden.
set -uo pipefail
part=${1:?usage: bench/device_session.sh tests|harness|norm|gemv}
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
    step flash-attn 200 python3 bench/bench_flash_attn.py --all --flex --wgsl --out "$out/$day-h200-flash-attn.json"
    step run-cuda 90 python3 -m fusec run --model smollm2-135m --backend cuda --tokens 4 --verify --stats
    ;;
  norm)
    # wgpu first, in its own process (a fresh GPU state for the Vulkan timing; notes-norm-wgsl.md; its
    # candidate sweep, `--variants`, is left out here: 2026-11-21-h200-wgpu-sweep.log found the shipped
    # kernel best in every case), then cuda with every candidate kernel of each case timed side by side
    # (--variants); each step ends its case
    # loop at --budget-s and writes what it has; BENCHMARKS.md from both results files
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader > "$out/$day-h200-gpu.txt" 2>&1
    step norm-wgpu 230 python3 bench/harness.py --backend wgpu --budget-s 200 -o "$out/$day-h200-wgpu.json"
    step norm-cuda 320 python3 bench/harness.py --backend cuda --variants --budget-s 280 -o "$out/$day-h200-cuda.json"
    python3 -c "import sys; sys.path.insert(0, '.'); from fusec.bench.report import write_benchmarks_md as w; \
w(sys.argv[1:3], sys.argv[3])" "$out/$day-h200-wgpu.json" "$out/$day-h200-cuda.json" "$out/BENCHMARKS.md" \
      && echo "   wrote $out/BENCHMARKS.md"
    grep -h -A45 "variant sweep" "$out/$day-h200-norm-wgpu.log" "$out/$day-h200-norm-cuda.log"
    ;;
  harness)
    step harness 400 python3 bench/harness.py --backend all -o "$out/$day-h200.json" --markdown "$out/BENCHMARKS.md"
    step gemv 200 python3 bench/bench_gemv.py --out "$out/$day-h200-gemv.json"
    ;;
  gemv)
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$out/$day-h200-gpu.txt" 2>&1
    step gemv-tests 200 python3 -m pytest -q -m cuda -p no:cacheprovider -rfE tests/test_gemv_kernels.py
    step gemv 300 python3 bench/bench_gemv.py --out "$out/$day-h200-gemv.json"
    step probe-ceilings 120 python3 bench/probe_ceilings.py --no-triton --out "$out/$day-h200-probe-ceilings.json"
    ;;
  *)
    echo "unknown part '$part' (tests | harness | norm | gemv)" >&2
    exit 2
    ;;
esac
