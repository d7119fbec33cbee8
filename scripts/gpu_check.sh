#!/usr/bin/env bash
# The one prepared GPU check (issue #31): on a machine with a CUDA GPU, in under 10 minutes,
#   1. the cuda-marked tests (every chapter's smoke preset on CUDA with AMP, every router x backend under bf16),
#   2. benchmarks/bench_moe.py --device cuda --quick (the MoE layer against dense, backends, peers, end to end),
#   3. benchmarks/bench_compile.py --device cuda (graph breaks, the MoE layer and test-bed training, eager vs compiled),
#   4. every chapter's gpu preset on a sliver (scripts/gpu_slivers.py: 2 configs per chapter, 1 epoch, 512 images),
# writing each step's log and tables under OUT (default results/benchmarks/cuda/) and a summary OUT/gpu_check.md.
#
#   bash scripts/gpu_check.sh [OUT]
#
# Environment: PYTHON (default .venv/bin/python if there, else python3); GPU_CHECK_DATASET replaces the gpu
# presets' dataset in step 4 where CIFAR cannot be had (e.g. fashion_mnist with VMOE_DATA_DIR holding its four
# files); GPU_CHECK_STEP_LIMIT (seconds per step, default 240). Results of the chapter runs go to a scratch folder,
# never to results/.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
OUT=${1:-results/benchmarks/cuda}
LIMIT=${GPU_CHECK_STEP_LIMIT:-240}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY; nothing run" >&2
  exit 2
fi
scratch=$(mktemp -d)
export VMOE_RESULTS_DIR="$scratch/results" VMOE_CACHE_DIR="$scratch/cache"
unset VMOE_REQUIRE_RESULTS
summary="$OUT/gpu_check.md"
{
  echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
  echo
  "$PY" -c "import torch, timm; print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, timm {timm.__version__}')"
  echo
  echo "| step | exit | seconds |"
  echo "|---|---:|---:|"
} > "$summary"
failed=0
step() {
  local name=$1; shift
  echo "== $name: $*"
  local start; start=$(date +%s)
  timeout "$LIMIT" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && failed=1
  echo "| $name | $rc | $(( $(date +%s) - start )) |" >> "$summary"
  tail -n 5 "$OUT/$name.log"
}
step cuda_tests "$PY" -m pytest -p no:cacheprovider -q -m cuda tests
step bench_moe "$PY" benchmarks/bench_moe.py --device cuda --quick --out "$OUT/moe_layer_quick.json"
step bench_compile "$PY" benchmarks/bench_compile.py --device cuda --sections breaks,layer,e2e --out "$OUT/compile.json"
sliver_args=(--device cuda --per-chapter 2 --out "$OUT/gpu_slivers.json")
[ -n "${GPU_CHECK_DATASET:-}" ] && sliver_args+=(--dataset "$GPU_CHECK_DATASET")
step gpu_slivers "$PY" scripts/gpu_slivers.py "${sliver_args[@]}"
rm -rf "$scratch"
cat "$summary"
exit $failed
