#!/usr/bin/env bash
# The main job on the bundled mini corpus, on a CPU, with nothing to download:
#   1. HuBERT first-iteration targets (MFCC + k-means)         -> runs/mini/labels
#   2. a small HuBERT teacher, fairseq's hubert_pretraining     -> runs/mini/teacher
#   3. two students distilled from it, shaped like the presets  -> runs/mini/{thin_deep,distilhubert}
#      thin_deep:    thin CNN, 6 x 64, time reduction x2, hints on every layer (FitHuBERT)
#      distilhubert: the teacher's CNN + 1 x 96 initialised from it, heads for all teacher layers
#   4. CTC fine-tuning of the teacher and of each student       -> runs/mini/ft_*
#   5. Viterbi decoding of the test split with fairseq's infer.py, WER/CER -> runs/mini/decode_*
#   6. results table (params with/without heads, MACs, CPU time vs the teacher, similarity to the
#      teacher, WER/CER) and plots (training curves, per-layer similarity) -> runs/mini/results.md, *.png
# Finished steps are skipped on a re-run (delete runs/mini to start over). Usage:
#   bash examples/mini/run.sh            full run, about 20 minutes on 2 CPU cores
#   bash examples/mini/run.sh --quick    every stage with fewer updates (runs/mini_quick), about 5 minutes
#   (OUT=dir DATA=manifest_dir to change the folders)
set -euo pipefail
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$REPO/manifests}"
if [ "$QUICK" = 1 ]; then OUT="${OUT:-$REPO/runs/mini_quick}"; else OUT="${OUT:-$REPO/runs/mini}"; fi
# updates per stage: teacher pre-training, distillation, fine-tuning
if [ "$QUICK" = 1 ]; then U_TEACHER=100 U_DISTIL=100 U_FT=200; else U_TEACHER=300 U_DISTIL=300 U_FT=600; fi
BIN="$(dirname "$(command -v python)")"
[ -x "$REPO/.venv/bin/fairseq-hydra-train" ] && BIN="$REPO/.venv/bin"
CPU=(common.fp16=false distributed_training.distributed_world_size=1 dataset.num_workers=0)
mkdir -p "$OUT"
SECONDS=0

step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }
done_in() { [ -f "$1" ] && echo "   (done: $1)"; }
train() {  # train NAME CONFIG OVERRIDES...: fairseq-hydra-train, progress lines only
  local dir="$OUT/$1" config="$2"; shift 2
  "$BIN/fairseq-hydra-train" --config-name "$config" "checkpoint.save_dir=$dir" "hydra.run.dir=$dir" \
    common.log_format=simple "$@" 2>&1 | tee "$dir.log" | grep --line-buffered -E "train_inner|\[valid\]|Error|error" || true
  [ -f "$dir/checkpoint_last.pt" ] || { echo "training $1 failed; see $dir.log"; exit 1; }
}

step "1/6 MFCC k-means targets"
done_in "$OUT/labels/train.km" || "$BIN/fairseq-kd-mfcc-kmeans" --manifest-dir "$DATA" --splits train valid \
  --n-clusters 50 --out-dir "$OUT/labels"

step "2/6 HuBERT teacher (fairseq hubert_pretraining, 3 x 96)"
done_in "$OUT/teacher/checkpoint_last.pt" || train teacher hubert_mini_teacher \
  "task.data=$DATA" "task.label_dir=$OUT/labels" common.log_interval=50 "optimization.max_update=$U_TEACHER"
TEACHER="$OUT/teacher/checkpoint_last.pt"

DISTILL=("task.data=$DATA" "task.teacher_path=$TEACHER" "${CPU[@]}" model.teacher_embed_dim=96
  task.max_sample_size=48000 dataset.batch_size=8 optimization.update_freq=[1] optimization.lr=[0.002]
  "optimization.max_update=$U_DISTIL" "lr_scheduler.warmup_updates=$((U_DISTIL / 10))" common.log_interval=50
  dataset.validate_interval=1000 "dataset.validate_interval_updates=$((U_DISTIL / 6))" "checkpoint.save_interval_updates=$U_DISTIL")

step "3/6 distil a thin_deep-shaped student (FitHuBERT: thin CNN, 6 x 64, time reduction, hints)"
done_in "$OUT/thin_deep/checkpoint_last.pt" || train thin_deep thin_deep "${DISTILL[@]}" \
  model.encoder_layers=6 model.encoder_embed_dim=64 model.encoder_ffn_embed_dim=64 \
  model.encoder_attention_heads=4 "model.conv_channels=[32,64,64,64,64,64,96,96,96]" \
  "model.hint_layer_ids=[1,2,3,4,5,6]" "criterion.hint_targets=[1,1,2,2,3,3]"

step "3/6 distil a distilhubert-shaped student (teacher CNN + 1 x 96, initialised from the teacher)"
done_in "$OUT/distilhubert/checkpoint_last.pt" || train distilhubert distilhubert "${DISTILL[@]}" \
  model.encoder_layers=1 model.encoder_embed_dim=96 model.encoder_ffn_embed_dim=192 \
  model.encoder_attention_heads=4 "model.conv_channels=[64,64,64,64,64,64,64]" \
  "model.pred_layer_ids=[1,2,3]" model.init_teacher_layers=1 model.conv_pos_groups=16

FINETUNE=("task.data=$DATA" "${CPU[@]}" "optimization.max_update=$U_FT" "optimization.lr=[0.0005]"
  model.freeze_finetune_updates=0 model.mask_prob=0.25 model.mask_channel_prob=0.1
  model.mask_channel_length=4 model.layerdrop=0.0 dataset.max_tokens=320000
  dataset.validate_interval=1000 "dataset.validate_interval_updates=$((U_FT / 3))" dataset.validate_after_updates=0
  "checkpoint.save_interval_updates=$U_FT" common.log_interval=50 +lr_scheduler.phase_ratio=[0.1,0.4,0.5])

for model in teacher thin_deep distilhubert; do
  step "4/6 CTC fine-tuning of $model (fairseq hubert_ctc, audio_finetuning)"
  done_in "$OUT/ft_$model/checkpoint_best.pt" || train "ft_$model" finetune_base_10h \
    "${FINETUNE[@]}" "model.w2v_path=$OUT/$model/checkpoint_last.pt"
done

for model in teacher thin_deep distilhubert; do
  step "5/6 decode the test split with $model (fairseq infer.py, Viterbi)"
  "$BIN/fairseq-kd-infer" --config-name decode_viterbi "task.data=$DATA" dataset.gen_subset=test \
    common.cpu=true "common_eval.path=$OUT/ft_$model/checkpoint_best.pt" \
    "decoding.results_path=$OUT/decode_$model" > "$OUT/decode_$model.log" 2>&1 \
    || { echo "decoding failed; see $OUT/decode_$model.log"; exit 1; }
  "$BIN/fairseq-kd-score" "$OUT/decode_$model"
done

step "6/6 results: size, compute, CPU time vs the teacher, similarity, WER/CER; plots"
"$BIN/fairseq-kd-report" "$OUT" --data "$DATA" --split test
echo "total ${SECONDS}s; everything is under $OUT"
