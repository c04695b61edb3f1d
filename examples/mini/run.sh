#!/usr/bin/env bash
# The main job on the bundled mini corpus, on a CPU, with nothing to download:
#   1. HuBERT first-iteration targets (MFCC + k-means)         -> runs/mini/labels
#   2. a small HuBERT teacher, fairseq's hubert_pretraining     -> runs/mini/teacher
#   3. two students distilled from it, shaped like the presets  -> runs/mini/{thin_deep,distilhubert}
#      thin_deep:    thin CNN, 6 x 64, time reduction x2, hints on every layer (FitHuBERT)
#      distilhubert: the teacher's CNN + 1 x 96 initialised from it, heads for all teacher layers
#   4. CTC fine-tuning of the teacher, of each student and of each student's undistilled twin (the
#      same architecture from random initialisation, same budget: does distillation help?) -> runs/mini/ft_*
#   5. Viterbi decoding of the test split with fairseq's infer.py, WER/CER -> runs/mini/decode_*
#   6. results table (params with/without heads, MACs, CPU time vs the teacher, similarity to the
#      teacher, WER/CER, distilled beside undistilled, the teacher's k-means target accuracy) and
#      plots (training curves, per-layer similarity, distilled vs undistilled) -> runs/mini/results.md, *.png
# Runs of one stage go side by side, one thread each (these models are too small for intra-op
# threads to pay off). Finished steps (training, decoding, the report) are skipped on a re-run
# (delete the folder to start over; FAIRSEQ_KD_VERBOSE=1: fairseq's INFO lines in the scripts too).
#   bash examples/mini/run.sh            full run (runs/mini)
#   bash examples/mini/run.sh --quick    every stage with fewer updates (runs/mini_quick)
#   LABELLED=40 OUT=runs/mini_l40 bash examples/mini/run.sh   fine-tune on 40 labelled utterances
#   OUT=dir DATA=manifest_dir bash examples/mini/run.sh   other folders
set -euo pipefail
set -f  # no globbing: overrides such as model.conv_channels=[32,64] are words, not patterns
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="$(cd "${DATA:-$REPO/manifests}" && pwd)"
if [ "$QUICK" = 1 ]; then OUT="${OUT:-$REPO/runs/mini_quick}"; else OUT="${OUT:-$REPO/runs/mini}"; fi
# updates per stage: teacher pre-training, distillation, fine-tuning
if [ "$QUICK" = 1 ]; then U_TEACHER=150 U_DISTIL=100 U_FT=150; else U_TEACHER=1000 U_DISTIL=300 U_FT=400; fi
LABELLED="${LABELLED:-0}"  # labelled training utterances for fine-tuning (0: all of train; use a fresh OUT)
BIN="$(dirname "$(command -v python)")"
[ -x "$REPO/.venv/bin/fairseq-hydra-train" ] && BIN="$REPO/.venv/bin"
CPU=(common.fp16=false distributed_training.distributed_world_size=1 dataset.num_workers=0)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SECONDS=0

step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }
finished() { [ -f "$OUT/$1/checkpoint_last.pt" ]; }
train() {  # train NAME CONFIG OVERRIDES...: fairseq-hydra-train; full log in NAME.log, progress lines shown
  local name="$1" dir="$OUT/$1" config="$2"; shift 2
  if finished "$name"; then echo "[$name] done before: $dir"; return; fi
  local max=0 arg
  for arg in "$@"; do case "$arg" in optimization.max_update=*) max="${arg#*=}";; esac; done
  "$BIN/fairseq-hydra-train" --config-name "$config" "checkpoint.save_dir=$dir" "hydra.run.dir=$dir" \
    common.log_format=simple "$@" 2>&1 | tee "$dir.log" | grep --line-buffered -E "train_inner|\]\[valid\]|Error" \
    | sed -u -E -e 's/^\[[^]]*\]\[(train_inner|valid)\]\[INFO\] - //' -e "s/^/[$name] /" | eta "$max" || true
  finished "$name" || { echo "[$name] training failed; the end of $dir.log:"; tail -n 20 "$dir.log"; return 1; }
}
eta() {  # eta MAX_UPDATE: append the time left to each progress line, from its wall= and num_updates=
  local max="$1" line n w  # a read loop, not awk: mawk buffers its input and would show nothing live
  while IFS= read -r line; do
    if [ "$max" -gt 0 ] && [[ $line =~ num_updates=([0-9]+) ]]; then
      n="${BASH_REMATCH[1]}"
      if [ "$n" -gt 0 ] && [[ $line =~ [^_[:alnum:]]wall=([0-9]+) ]]; then
        w="${BASH_REMATCH[1]}"
        line="$line  [$n/$max updates, about $((w * (max - n) / n))s left]"
      fi
    fi
    printf '%s\n' "$line"
  done
}
side_by_side() {  # side_by_side "NAME CONFIG OVERRIDES..." ...: one process per run, one thread each
  local pids=() spec pid failed=0
  for spec in "$@"; do
    eval "set -- ${spec//$'\n'/ }"  # the specs span lines for reading
    (export OMP_NUM_THREADS=1; train "$@") & pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return $failed
}

step "1/6 MFCC k-means targets"
[ -f "$OUT/labels/train.km" ] && echo "done before: $OUT/labels" || "$BIN/fairseq-kd-mfcc-kmeans" \
  --manifest-dir "$DATA" --splits train valid --n-clusters 50 --n-init 4 --out-dir "$OUT/labels"

step "2/6 HuBERT teacher (fairseq hubert_pretraining, 3 x 96, $U_TEACHER updates)"
train teacher hubert_mini_teacher "task.data=$DATA" "task.label_dir=$OUT/labels" \
  "optimization.max_update=$U_TEACHER" "lr_scheduler.warmup_updates=$((U_TEACHER * 2 / 25))" \
  common.log_interval=50 "dataset.validate_interval_updates=$U_TEACHER" "checkpoint.save_interval_updates=$U_TEACHER"
TEACHER="$OUT/teacher/checkpoint_last.pt"

step "3/6 distil thin_deep (FitHuBERT shape: thin CNN, 6 x 64, x2 time reduction, hints) and distilhubert (teacher CNN + 1 x 96, heads), $U_DISTIL updates"
DISTILL="task.data=$DATA task.teacher_path=$TEACHER ${CPU[*]} model.teacher_embed_dim=96
  task.max_sample_size=48000 dataset.batch_size=8 optimization.update_freq=[1] optimization.lr=[0.002]
  optimization.max_update=$U_DISTIL lr_scheduler.warmup_updates=$((U_DISTIL / 10)) common.log_interval=50
  dataset.validate_interval=1000 dataset.validate_interval_updates=$((U_DISTIL / 6)) checkpoint.save_interval_updates=$U_DISTIL"
side_by_side \
  "thin_deep thin_deep $DISTILL model.encoder_layers=6 model.encoder_embed_dim=64 model.encoder_ffn_embed_dim=64
   model.encoder_attention_heads=4 model.conv_channels=[32,64,64,64,64,64,96,96,96]
   model.hint_layer_ids=[1,2,3,4,5,6] criterion.hint_targets=[1,1,2,2,3,3]" \
  "distilhubert distilhubert $DISTILL model.encoder_layers=1 model.encoder_embed_dim=96 model.encoder_ffn_embed_dim=192
   model.encoder_attention_heads=4 model.conv_channels=[64,64,64,64,64,64,64]
   model.pred_layer_ids=[1,2,3] model.init_teacher_layers=1 model.conv_pos_groups=16"

# labelled data for fine-tuning: LABELLED training utterances (every k-th one, all speakers), as in
# the low-resource setups (Libri-light's 10 min / 1 h) where pre-training is what matters; the
# teacher's pre-training and the distillation use all of train, unlabelled
labelled_subset() {  # labelled_subset N: $OUT/labelled holds train (N rows), valid, test, dict.ltr.txt
  local n="$1" dir="$OUT/labelled" total root k
  total=$(($(wc -l < "$DATA/train.tsv") - 1))
  if [ "$n" -le 0 ] || [ "$n" -ge "$total" ]; then FT_DATA="$DATA"; return; fi
  k=$((total / n)); root="$(cd "$DATA" && cd "$(head -n 1 train.tsv)" && pwd)"
  mkdir -p "$dir"
  pick() { awk -v k="$k" -v n="$n" '(NR - 1) % k == 0 && c < n { print; c++ }' "$1"; }
  # manifests with the absolute audio root (fairseq reads a relative root from its working directory)
  { echo "$root"; tail -n +2 "$DATA/train.tsv" | pick /dev/stdin; } > "$dir/train.tsv"
  for ext in ltr wrd; do pick "$DATA/train.$ext" > "$dir/train.$ext"; done
  for split in valid test; do
    { (cd "$DATA" && cd "$(head -n 1 "$split.tsv")" && pwd); tail -n +2 "$DATA/$split.tsv"; } > "$dir/$split.tsv"
    for ext in ltr wrd; do if [ -f "$DATA/$split.$ext" ]; then cp "$DATA/$split.$ext" "$dir/$split.$ext"; fi; done
  done
  cp "$DATA/dict.ltr.txt" "$dir/dict.ltr.txt"
  FT_DATA="$dir"
}
labelled_subset "$LABELLED"

step "4/6 CTC fine-tuning of the teacher, both students and their undistilled twins (fairseq hubert_ctc, kd_audio_finetuning), $U_FT updates"
# every encoder fine-tunes whole, CNN included (feature_grad_mult=1): the twins' random CNN must
# train, and the same budget for all is what makes the rows comparable
FINETUNE="task.data=$FT_DATA ${CPU[*]} optimization.max_update=$U_FT optimization.lr=[0.003]
  model.freeze_finetune_updates=0 model.feature_grad_mult=1.0 model.mask_prob=0.25 model.mask_channel_prob=0.1
  model.mask_channel_length=4 model.layerdrop=0.0 dataset.max_tokens=160000
  dataset.validate_interval=1000 dataset.validate_interval_updates=$((U_FT / 3)) dataset.validate_after_updates=0
  checkpoint.save_interval_updates=$U_FT common.log_interval=50 +lr_scheduler.phase_ratio=[0.1,0.4,0.5]"
# the undistilled twin: the distilled checkpoint gives only the architecture (fairseq's
# no_pretrained_weights), trained from random initialisation with the same settings
UNDISTILLED="+model.no_pretrained_weights=true"
side_by_side \
  "ft_teacher finetune_base_10h $FINETUNE model.w2v_path=$OUT/teacher/checkpoint_last.pt" \
  "ft_thin_deep finetune_base_10h $FINETUNE model.w2v_path=$OUT/thin_deep/checkpoint_last.pt" \
  "ft_distilhubert finetune_base_10h $FINETUNE model.w2v_path=$OUT/distilhubert/checkpoint_last.pt" \
  "ft_thin_deep_undistilled finetune_base_10h $FINETUNE $UNDISTILLED model.w2v_path=$OUT/thin_deep/checkpoint_last.pt" \
  "ft_distilhubert_undistilled finetune_base_10h $FINETUNE $UNDISTILLED model.w2v_path=$OUT/distilhubert/checkpoint_last.pt"

step "5/6 decode the test split (fairseq infer.py, Viterbi) and score WER / CER"
decoded() { [ -s "$OUT/decode_$1/hypo.word" ] && [ "$OUT/decode_$1/hypo.word" -nt "$OUT/ft_$1/checkpoint_best.pt" ]; }
pids=()
MODELS=(teacher thin_deep distilhubert thin_deep_undistilled distilhubert_undistilled)
for model in "${MODELS[@]}"; do
  if decoded "$model"; then echo "[decode_$model] done before: $OUT/decode_$model"; continue; fi
  OMP_NUM_THREADS=1 "$BIN/fairseq-kd-infer" --config-name decode_viterbi "task.data=$DATA" dataset.gen_subset=test \
    common.cpu=true "common_eval.path=$OUT/ft_$model/checkpoint_best.pt" \
    "decoding.results_path=$OUT/decode_$model" > "$OUT/decode_$model.log" 2>&1 & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || { echo "decoding failed; see $OUT/decode_*.log"; exit 1; }; done
for model in "${MODELS[@]}"; do
  # stderr (fairseq's import-time INFO lines, warnings) goes to the log, not into the table
  printf '%-26s' "$model"; "$BIN/fairseq-kd-score" "$OUT/decode_$model" 2>>"$OUT/score.log" \
    || { echo "scoring failed; the end of $OUT/score.log:"; tail -n 20 "$OUT/score.log"; exit 1; }
done

step "6/6 results: size, compute, CPU time vs the teacher, similarity, WER/CER; plots"
# the report rebuilds only when one of its inputs changed, and says which it did
"$BIN/fairseq-kd-report" "$OUT" --data "$DATA" --split test 2>> "$OUT/report.log" \
  || { echo "the report failed; the end of $OUT/report.log:"; tail -n 20 "$OUT/report.log"; exit 1; }
echo "total ${SECONDS}s; everything is under $OUT"
