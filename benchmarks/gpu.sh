#!/usr/bin/env bash
# The prepared GPU check, in one call: elision throughput at ~2B scale on one GPU (ReGATE, visual-token
# elision and both, at 39 % and 24 % answer shares, each step profiled and compared with the profile's
# cost model, peak memory per variant; the policy's time per step with a score store of 1M samples x 100
# candidates; the headline part again on a Qwen3-VL-2B-shaped model), then the strategy checks (benchmarks/gpu_strategies.py: FSDP, and DeepSpeed ZeRO-2/3 when
# deepspeed imports). Meant to finish in about 8 minutes (GPU_TOTAL_S).
#
#   bash benchmarks/gpu.sh                 # results in $OUT (default ./gpu_results)
#   bash benchmarks/gpu.sh --batch-size 1  # extra arguments go to benchmarks/gpu_throughput.py
#
# Needs python3 with torch (CUDA), transformers >= 5.0, lightning, peft; no network, and the package
# need not be installed (PYTHONPATH is set to the repository). Wheels carried in .whl/ (transformers,
# deepspeed and its dependencies: docs/scale.md says how to make them) are installed first, into
# .whl/site, which goes first on PYTHONPATH; nothing is installed into the machine's own Python. Every
# part runs even if an earlier one failed; each prints its own errors.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-$PWD/gpu_results}"
export TOKENIZERS_PARALLELISM=false
# Baseline and ReGATE steps alternate between two sequence lengths: avoid allocator fragmentation.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
TOTAL_S="${GPU_TOTAL_S:-480}"
start=$(date +%s)

if ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing the carried wheels (.whl/*.whl) into .whl/site =="
  "$PY" -m pip install --quiet --no-index --no-deps --target .whl/site .whl/*.whl 2>&1 | tail -3 \
    || echo "wheel install failed: continuing with the machine's packages"
  export PYTHONPATH="$PWD/.whl/site:$PYTHONPATH"
fi

echo "== benchmarks/gpu.sh, $(date -u '+%Y-%m-%d %H:%M UTC'), results in $OUT =="
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi unavailable"
"$PY" - <<'EOF' || echo "version check failed"
import torch, transformers, lightning
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, "
      f"lightning {lightning.__version__}, GPU: {gpu}")
EOF

echo
echo "== 1. throughput and profile (benchmarks/gpu_throughput.py) =="
# One process per part: no allocator state carried over. Headline first; the last part is the first to go.
# a1024-store: the policy's time per step with a store of 1M samples x 100 candidates (issue 13, < 1 %).
# FAMILY:PART runs PART on another family's model with 5 timed pairs per variant (gpu_throughput.py --family):
# qwen3_vl:a1024 is the headline on Qwen3-VL-2B's published sizes (DeepStack, a timestamp per temporal patch).
for part in ${GPU_PARTS:-a1024 a1024-store qwen3_vl:a1024 a512 a1024-frames a1024-frames-noskip a1024-more}; do
left=$(( TOTAL_S - 90 - ($(date +%s) - start) ))  # keep 90 s for the strategy checks
if [ "$left" -lt 30 ]; then echo "throughput $part: skipped (time budget)"; continue; fi
limit=$(( left < ${THROUGHPUT_TIMEOUT_S:-110} ? left : ${THROUGHPUT_TIMEOUT_S:-110} ))
name="$part"
family=()
case "$part" in *:*) name="${part#*:}"; family=(--family "${part%%:*}" --repeats 5) ;; esac
timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_throughput.py --out "$OUT" --only "$name" \
  ${family[@]+"${family[@]}"} "$@" 2>&1 | tee -a "$OUT/gpu_throughput.log"
status=${PIPESTATUS[0]}
[ "$status" -eq 124 ] && echo "throughput $part: stopped by the time limit (partial results in $OUT)"
echo "throughput $part exit status: $status"
done

if [ -f benchmarks/gpu_strategies.py ]; then
  left=$(( TOTAL_S - ($(date +%s) - start) ))
  [ "$left" -lt 60 ] && left=60
  echo
  echo "== 2. strategies (benchmarks/gpu_strategies.py, limit ${left} s) =="
  timeout --kill-after=10 "$left" "$PY" benchmarks/gpu_strategies.py 2>&1 | tee "$OUT/gpu_strategies.log"
  echo "strategies exit status: ${PIPESTATUS[0]}"
fi

echo
echo "== gpu.sh done in $(( $(date +%s) - start )) s =="
