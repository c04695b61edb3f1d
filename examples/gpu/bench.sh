#!/usr/bin/env bash
# One command on a machine with one CUDA GPU and the README install, nothing else: distillation
# throughput of thin_deep and distilhubert through fairseq's Trainer at the presets' batch shapes and
# precision (fp16 student, fp32 teacher; bf16 autocast for the forward-only timings), the teacher's
# forward alone as the ceiling, peak GPU memory of an update, and DistilHuBERT's 200k-update schedule
# at that rate. Writes OUT/bench_<preset>.json, OUT/gpu.json (both presets) and OUT/gpu.md (the table).
#
#   bash examples/gpu/bench.sh [OUT]                    # cuda, ~3-5 min on one H200-class GPU
#   bash examples/gpu/bench.sh --device cpu --tiny OUT  # the CPU dry run the test suite makes (tiny models)
#
# Batch shapes (the presets, fairseq_kd/config): distilhubert 24 utterances of 15.6 s crops (250k
# samples) per GPU; thin_deep 3 utterances per GPU (full utterances, up to 35 s): timed at
# LibriSpeech's 12.3 s mean length.
set -euo pipefail
cd "$(dirname "$0")/../.."

DEVICE=cuda
TINY=0
OUT=runs/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=1; shift ;;
    -h|--help) sed -n 2,14p "$0"; exit 0 ;;
    -*) echo "bench.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) OUT="$1"; shift ;;
  esac
done
BENCH="${FAIRSEQ_KD_BIN:-.venv/bin}/fairseq-kd-benchmark"
[ -x "$BENCH" ] || BENCH=fairseq-kd-benchmark
mkdir -p "$OUT"

if [ "$DEVICE" = cpu ]; then AMP=none; else AMP=bf16; fi
COMMON=(--device "$DEVICE" --amp "$AMP" --sections training memory --repeats 5 --warmup 2)
if [ "$TINY" = 1 ]; then  # the shapes of tests/test_benchmark.py: every step runs, in seconds
  COMMON=(--device "$DEVICE" --amp "$AMP" --sections training memory --repeats 2 --warmup 1 --threads 1
    --teacher-override encoder_layers=2 encoder_embed_dim=64 encoder_ffn_embed_dim=128 encoder_attention_heads=4
    "conv_feature_layers=[(64,10,5)] + [(64,3,2)] * 4 + [(64,2,2)] * 2"
    --override model.teacher_embed_dim=64 model.encoder_embed_dim=64 model.encoder_ffn_embed_dim=128
    model.encoder_attention_heads=4 thin_deep:model.encoder_layers=2 "thin_deep:model.hint_layer_ids=[1,2]"
    "thin_deep:model.conv_channels=[32,32,32,32,32,32,64,64,64]"
    "distilhubert:model.conv_channels=[64,64,64,64,64,64,64]" "distilhubert:model.pred_layer_ids=[1,2]")
  SHAPES=("distilhubert 2 0.5" "thin_deep 1 0.5")
else
  SHAPES=("distilhubert 24 15.6" "thin_deep 3 12.3")
fi

for shape in "${SHAPES[@]}"; do
  read -r preset batch seconds <<< "$shape"
  echo "== $preset: $batch x $seconds s on $DEVICE"
  "$BENCH" --presets "$preset" --batch "$batch" --seconds "$seconds" "${COMMON[@]}" \
    --out "$OUT/bench_$preset.json" --force
done

"${FAIRSEQ_KD_PYTHON:-.venv/bin/python}" -m fairseq_kd.benchmark.gpu_summary "$OUT" \
  "$OUT/bench_distilhubert.json" "$OUT/bench_thin_deep.json"
