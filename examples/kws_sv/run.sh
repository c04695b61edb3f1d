#!/usr/bin/env bash
# Joint keyword spotting + speaker verification on the bundled corpus' keyword subset, for a
# teacher and a distilled student, each with the encoder frozen and fine-tuned (arXiv 2210.16611's
# comparison, at toy scale, on a CPU):
#   1. check the keyword subset (labels, trial list, speaker-disjoint splits)
#   2. fairseq-hydra-train --config-name kws_sv_joint, four runs: {teacher, student} x {frozen,
#      fine-tuned (transformer and CNN)}                                  -> $OUT/{name}
#   3. fairseq-kd-eval-kws-sv on the test split (80 clips of 8 unseen speakers, 600 trials)
#   4. a results table                                                     -> $OUT/results.md
# The teacher and student are examples/mini/run.sh's (runs/mini/teacher, runs/mini/thin_deep);
# run that first, or give TEACHER=... STUDENT=... (any fairseq HuBERT / wav2vec 2.0 checkpoint and
# any thin_hubert student). Without a STUDENT file, one is distilled from TEACHER first
# (examples/mini/run.sh's thin_deep shape, for its 3 x 96 teacher; DISTIL_UPDATES, DISTIL_DATA)
# -> $OUT/student. Finished runs are skipped on a re-run.
#
# Two corpora (the paper's setup: keywords from one, speakers from another, no row with both):
# KWS_DATA=dir SV_DATA=dir (prepared by fairseq-kd-prepare-kws-sv, e.g. speech-commands and
# voxceleb1) trains on task.data='KWS_DATA,SV_DATA' with task.corpus_ratios=[RATIOS] and evaluates
# each task on its own corpus' test split; `two-corpus` without them stands in with the keyword
# subset split into a keyword-only and a speaker-only view with disjoint rows and speakers
# (fairseq-kd-prepare-kws-sv view) -> $OUT/data/{keywords,speakers}. Usage:
#   bash examples/kws_sv/run.sh                    one corpus (OUT, UPDATES, LR, JOBS: the defaults)
#   bash examples/kws_sv/run.sh two-corpus         the keyword subset's two disjoint views
#   KWS_DATA=data/sc12_kw SV_DATA=data/vox1 bash examples/kws_sv/run.sh   two prepared corpora
# (data/sc12_kw: fairseq-kd-prepare-kws-sv view --all-rows --view keywords of data/sc12, so that
# Speech Commands' speakers stay out of the speaker loss and its trials out of the EER)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$REPO/manifests/keywords}"
MODE=one
if [ -n "${KWS_DATA:-}${SV_DATA:-}" ]; then
  [ -n "${KWS_DATA:-}" ] && [ -n "${SV_DATA:-}" ] || { echo "give both KWS_DATA and SV_DATA (prepared folders), or neither"; exit 1; }
  MODE=two
elif [ "${1:-}" = "two-corpus" ]; then
  MODE=mini_views
elif [ -n "${1:-}" ]; then
  echo "unknown argument '$1' (expected: two-corpus, or nothing)"; exit 1
fi
if [ "$MODE" = one ]; then OUT="${OUT:-$REPO/runs/kws_sv/compare}"; else OUT="${OUT:-$REPO/runs/kws_sv/two_corpus}"; fi
# keyword spotting learns slower than the speaker head on the mini views: two keyword batches per speaker one
if [ "$MODE" = mini_views ]; then RATIOS="${RATIOS:-2.0,1.0}"; else RATIOS="${RATIOS:-1.0,1.0}"; fi
DISTIL_DATA="${DISTIL_DATA:-$REPO/manifests}"
DISTIL_UPDATES="${DISTIL_UPDATES:-300}"
TEACHER="${TEACHER:-$REPO/runs/mini/teacher/checkpoint_last.pt}"
STUDENT="${STUDENT:-$REPO/runs/mini/thin_deep/checkpoint_last.pt}"
UPDATES="${UPDATES:-1000}"
LR="${LR:-0.001}"
JOBS="${JOBS:-2}"  # runs at a time (each single-threaded)
BIN="$(dirname "$(command -v python)")"
[ -x "$REPO/.venv/bin/fairseq-hydra-train" ] && BIN="$REPO/.venv/bin"
[ -f "$TEACHER" ] || { echo "$TEACHER does not exist: run examples/mini/run.sh first (or set TEACHER)"; exit 1; }
absolute() { (cd "$1" 2>/dev/null && pwd) || { echo "$2=$1 is not a directory (a folder prepared by fairseq-kd-prepare-kws-sv)" >&2; exit 1; }; }
if [ "$MODE" = two ]; then  # hydra runs in the run folder: absolute paths, checked before any training
  KWS_DATA="$(absolute "$KWS_DATA" KWS_DATA)"
  SV_DATA="$(absolute "$SV_DATA" SV_DATA)"
fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
SECONDS=0
CPU=(common.fp16=false distributed_training.distributed_world_size=1 dataset.num_workers=0)

distil() {  # a thin_deep student from the mini teacher (examples/mini/run.sh's step 3) -> $OUT/student
  local dir="$OUT/student"
  [ -f "$dir/checkpoint_last.pt" ] && { echo "   (done: $dir)"; return; }
  echo "== 0/4 distil a thin_deep student from $TEACHER, $DISTIL_UPDATES updates"
  OMP_NUM_THREADS=1 "$BIN/fairseq-hydra-train" --config-name thin_deep "${CPU[@]}" "task.data=$DISTIL_DATA" \
    "task.teacher_path=$TEACHER" model.teacher_embed_dim=96 task.max_sample_size=48000 dataset.batch_size=8 \
    "optimization.update_freq=[1]" "optimization.lr=[0.002]" "optimization.max_update=$DISTIL_UPDATES" \
    "lr_scheduler.warmup_updates=$(( DISTIL_UPDATES / 10 > 0 ? DISTIL_UPDATES / 10 : 1 ))" common.log_interval=50 \
    dataset.disable_validation=true "checkpoint.save_interval_updates=$DISTIL_UPDATES" model.encoder_layers=6 \
    model.encoder_embed_dim=64 model.encoder_ffn_embed_dim=64 model.encoder_attention_heads=4 \
    "model.conv_channels=[32,64,64,64,64,64,96,96,96]" "model.hint_layer_ids=[1,2,3,4,5,6]" \
    "criterion.hint_targets=[1,1,2,2,3,3]" "checkpoint.save_dir=$dir" "hydra.run.dir=$dir" > "$dir.log" 2>&1 \
    || { echo "distillation failed; see $dir.log"; exit 1; }
}
if [ ! -f "$STUDENT" ]; then
  echo "   $STUDENT does not exist: distilling one"
  mkdir -p "$OUT/student"
  distil
  STUDENT="$OUT/student/checkpoint_last.pt"
fi

if [ "$MODE" = mini_views ]; then  # two corpora from one: disjoint keyword-only / speaker-only rows
  for view in keywords speakers; do
    if [ -f "$OUT/data/$view/train.tsv" ]; then echo "   (done: $OUT/data/$view)"; else
      "$BIN/fairseq-kd-prepare-kws-sv" view --data "$DATA" --view "$view" --dest "$OUT/data/$view" > /dev/null
    fi
  done
  KWS_DATA="$OUT/data/keywords" SV_DATA="$OUT/data/speakers"
fi
if [ "$MODE" = one ]; then
  echo "== 1/4 check $DATA"
  "$BIN/fairseq-kd-prepare-kws-sv" check --data "$DATA"
  TASK_DATA=("task.data=$DATA")
else
  echo "== 1/4 check the keyword corpus $KWS_DATA and the speaker corpus $SV_DATA"
  "$BIN/fairseq-kd-prepare-kws-sv" check --data "$KWS_DATA" --no-sv
  "$BIN/fairseq-kd-prepare-kws-sv" check --data "$SV_DATA" --no-kws
  for f in "$KWS_DATA/train.spk" "$SV_DATA/train.kw"; do  # each row keeps every label it has
    if [ -f "$f" ] && grep -qv '^-$' "$f"; then
      echo "   note: $f has labels: that corpus then trains both tasks (a one-label copy:" \
        "fairseq-kd-prepare-kws-sv view --all-rows --view keywords|speakers)"
    fi
  done
  DATA="$KWS_DATA,$SV_DATA"  # quoted for hydra below: a bare comma is a sweep
  TASK_DATA=("task.data='$DATA'" "task.corpus_ratios=[$RATIOS]")
fi

COMMON=("${CPU[@]}" "${TASK_DATA[@]}" common.log_interval=100 "optimization.max_update=$UPDATES" "optimization.lr=[$LR]"
  dataset.batch_size=16 dataset.validate_interval=1000 "dataset.validate_interval_updates=$((UPDATES / 4))"
  checkpoint.save_interval=1000 "checkpoint.save_interval_updates=$((UPDATES / 4))"
  model.kws_hidden_dim=128 model.sv_hidden_dim=128 model.sv_embed_dim=128)
FROZEN=(model.freeze_finetune_updates=100000000)
FINETUNED=(model.freeze_finetune_updates=0 model.feature_grad_mult=1.0)

train() {  # train NAME ENCODER OVERRIDES...
  local name="$1" encoder="$2"; shift 2
  local dir="$OUT/$name"
  [ -f "$dir/checkpoint_best.pt" ] && { echo "   (done: $dir)"; return; }
  OMP_NUM_THREADS=1 "$BIN/fairseq-hydra-train" --config-name kws_sv_joint "${COMMON[@]}" \
    "model.w2v_path=$encoder" "checkpoint.save_dir=$dir" "hydra.run.dir=$dir" "$@" > "$dir.log" 2>&1 \
    || { echo "training $name failed; see $dir.log"; exit 1; }
  echo "   $name: $(grep '\[valid\]' "$dir.log" | tail -1 | grep -o '"valid_kws_accuracy": "[0-9.]*"\|"valid_eer": "[0-9.]*"' | tr '\n' ' ')"
}

echo "== 2/4 joint fine-tuning on ${DATA}, $UPDATES updates of 16 clips, lr $LR"
names=(teacher_frozen teacher_finetuned student_frozen student_finetuned)
encoders=("$TEACHER" "$TEACHER" "$STUDENT" "$STUDENT")
for i in "${!names[@]}"; do
  case "${names[$i]}" in *frozen) extra=("${FROZEN[@]}");; *) extra=("${FINETUNED[@]}");; esac
  train "${names[$i]}" "${encoders[$i]}" "${extra[@]}" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
done
wait

echo "== 3/4 evaluate the test split (two corpora: keywords on the first's, EER on the second's trials)"
checkpoints=()
for n in "${names[@]}"; do checkpoints+=("$OUT/$n/checkpoint_best.pt"); done
"$BIN/fairseq-kd-eval-kws-sv" "${checkpoints[@]}" --data "$DATA" --split test --cpu > "$OUT/evaluate.log" 2>&1 \
  || { echo "evaluation failed; see $OUT/evaluate.log"; exit 1; }

echo "== 4/4 results"
"$BIN/python" - "$OUT" "${names[@]}" <<'EOF' | tee "$OUT/results.md"
import json, sys
out, names = sys.argv[1], sys.argv[2:]
print("| encoder | fine-tuning | params (encoder) | keyword accuracy % | EER % | minDCF |")
print("|---|---|---|---|---|---|")
for name in names:
    r = json.load(open(f"{out}/{name}/checkpoint_best.test.json"))
    who, how = name.split("_")
    how = {"frozen": "frozen", "finetuned": "fine-tuned (CNN + transformer)"}[how]
    print(f"| {who} ({r['encoder']}) | {how} | {r['encoder_params'] / 1e6:.2f} M | {r['kws_accuracy']:.1f} | {r['eer']:.1f} | {r['min_dcf']:.3f} |")
EOF
echo "total ${SECONDS}s; everything is under $OUT"
