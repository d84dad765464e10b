#!/usr/bin/env bash
# The prepared GPU check, in one call: elision throughput at ~2B scale on one GPU (ReGATE, visual-token
# elision and both, at 39 % and 24 % answer shares, each step profiled and compared with the profile's
# cost model, peak memory per variant; the policy's time per step with a score store of 1M samples x 100
# candidates); a Qwen3.5-0.8B-shaped step (part 1b: the hybrid gated delta-net decoder, GPU_QWEN3_5_S seconds,
# 0 skips it); a Qwen3-VL-2B-shaped step (part 1c: DeepStack, a timestamp per temporal patch; GPU_QWEN3_VL_S
# seconds, 0 skips it); packed vs padded steps on a LLaVA-Video-178K-shaped length mix (part 2:
# benchmarks/packing.py, PACKING_TIMEOUT_S, 0 skips it); then the strategy checks (benchmarks/gpu_strategies.py:
# FSDP, and DeepSpeed ZeRO-2/3 when deepspeed imports). Meant to finish in about 8 minutes (GPU_TOTAL_S); part 1
# gets what the later parts leave (about 140 s: its headline a1024 first).
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
QWEN3_5_S="${GPU_QWEN3_5_S:-80}"  # part 1b's share of the budget (0 skips it)
QWEN3_VL_S="${GPU_QWEN3_VL_S:-80}"  # part 1c's share of the budget (0 skips it)
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

# run_parts NAME LOG RESERVE_S CAP_S "PARTS" [ARGS...]: benchmarks/gpu_throughput.py once per part (one process
# each: no allocator state carried over), each under CAP_S or what is left of the budget after RESERVE_S for the
# later parts (a part with under 30 s left is skipped); ARGS go to gpu_throughput.py; output appended to $OUT/LOG.
run_parts() {
  local name=$1 log=$2 reserve=$3 cap=$4 parts=$5 part left limit status
  shift 5
  for part in $parts; do
    left=$(( TOTAL_S - reserve - ($(date +%s) - start) ))
    if [ "$left" -lt 30 ]; then echo "$name $part: skipped (time budget)"; continue; fi
    limit=$(( left < cap ? left : cap ))
    timeout --kill-after=10 "$limit" "$PY" benchmarks/gpu_throughput.py --out "$OUT" --only "$part" "$@" \
      2>&1 | tee -a "$OUT/$log"
    status=${PIPESTATUS[0]}
    [ "$status" -eq 124 ] && echo "$name $part: stopped by the time limit (partial results in $OUT)"
    echo "$name $part exit status: $status"
  done
}

echo
echo "== 1. throughput and profile (benchmarks/gpu_throughput.py) =="
# Headline first; the last part is the first to go (time is kept for 1b, 1c, 2, 3).
# a1024-store: the policy's time per step with a store of 1M samples x 100 candidates (issue 13, < 1 %).
PACKING_S="${PACKING_TIMEOUT_S:-90}"
run_parts throughput gpu_throughput.log $(( 90 + QWEN3_5_S + QWEN3_VL_S + PACKING_S )) "${THROUGHPUT_TIMEOUT_S:-110}" \
  "${GPU_PARTS:-a1024 a1024-store a512 a1024-frames a1024-frames-noskip a1024-more}" "$@"

# Part 1b: the Qwen3.5-0.8B-shaped step (hybrid decoder: 18 gated delta-net and 6 full-attention layers), its
# headline part only by default (GPU_QWEN3_5_PARTS="a1024 a1024-frames" adds whole-frame elision).
if [ "$QWEN3_5_S" -gt 0 ]; then
  echo
  echo "== 1b. Qwen3.5-shaped step (benchmarks/gpu_throughput.py --family qwen3_5) =="
  run_parts qwen3_5 gpu_throughput_qwen3_5.log $(( 90 + QWEN3_VL_S + PACKING_S )) "$QWEN3_5_S" \
    "${GPU_QWEN3_5_PARTS:-a1024}" --family qwen3_5
fi

# Part 1c: the Qwen3-VL-2B-shaped step (DeepStack features into the first 3 decoder layers, a timestamp before each
# temporal patch), its headline part only by default (GPU_QWEN3_VL_PARTS="a1024 a1024-frames" adds whole-frame
# elision).
if [ "$QWEN3_VL_S" -gt 0 ]; then
  echo
  echo "== 1c. Qwen3-VL-shaped step (benchmarks/gpu_throughput.py --family qwen3_vl) =="
  run_parts qwen3_vl gpu_throughput_qwen3_vl.log $(( 90 + PACKING_S )) "$QWEN3_VL_S" \
    "${GPU_QWEN3_VL_PARTS:-a1024}" --family qwen3_vl
fi

if [ "$PACKING_S" -gt 0 ]; then
  echo
  echo "== 2. packed vs padded steps (benchmarks/packing.py, limit ${PACKING_S} s) =="
  # Qwen2-VL-2B's text backbone, bf16, batches of 8 clips of 5-60 s (32 tokens per frame): baseline and ReGATE,
  # padded and packed (FlashAttention-2 where flash_attn imports, else sdpa_varlen); packing.json in $OUT.
  timeout --kill-after=10 "$PACKING_S" "$PY" benchmarks/packing.py --device cuda --dtype bfloat16 --preset gpu \
    --batches 3 --repeats 3 --out "$OUT" 2>&1 | tee "$OUT/packing.log"
  echo "packing exit status: ${PIPESTATUS[0]}"
fi

if [ -f benchmarks/gpu_strategies.py ]; then
  left=$(( TOTAL_S - ($(date +%s) - start) ))
  [ "$left" -lt 60 ] && left=60
  echo
  echo "== 3. strategies (benchmarks/gpu_strategies.py, limit ${left} s) =="
  timeout --kill-after=10 "$left" "$PY" benchmarks/gpu_strategies.py 2>&1 | tee "$OUT/gpu_strategies.log"
  echo "strategies exit status: ${PIPESTATUS[0]}"
fi

echo
echo "== gpu.sh done in $(( $(date +%s) - start )) s =="
