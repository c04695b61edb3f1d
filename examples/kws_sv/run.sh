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
# any thin_hubert student). Finished runs are skipped on a re-run. Usage:
#   bash examples/kws_sv/run.sh        (OUT, UPDATES, LR, JOBS to change the defaults)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-$REPO/manifests/keywords}"
OUT="${OUT:-$REPO/runs/kws_sv/compare}"
TEACHER="${TEACHER:-$REPO/runs/mini/teacher/checkpoint_last.pt}"
STUDENT="${STUDENT:-$REPO/runs/mini/thin_deep/checkpoint_last.pt}"
UPDATES="${UPDATES:-1000}"
LR="${LR:-0.001}"
JOBS="${JOBS:-2}"  # runs at a time (each single-threaded)
BIN="$(dirname "$(command -v python)")"
[ -x "$REPO/.venv/bin/fairseq-hydra-train" ] && BIN="$REPO/.venv/bin"
for f in "$TEACHER" "$STUDENT"; do
  [ -f "$f" ] || { echo "$f does not exist: run examples/mini/run.sh first (or set TEACHER / STUDENT)"; exit 1; }
done
mkdir -p "$OUT"
SECONDS=0

echo "== 1/4 check $DATA"
"$BIN/fairseq-kd-prepare-kws-sv" check --data "$DATA"

COMMON=(common.fp16=false distributed_training.distributed_world_size=1 dataset.num_workers=0
  "task.data=$DATA" common.log_interval=100 "optimization.max_update=$UPDATES" "optimization.lr=[$LR]"
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

echo "== 2/4 joint fine-tuning, $UPDATES updates of 16 clips, lr $LR"
names=(teacher_frozen teacher_finetuned student_frozen student_finetuned)
encoders=("$TEACHER" "$TEACHER" "$STUDENT" "$STUDENT")
for i in "${!names[@]}"; do
  case "${names[$i]}" in *frozen) extra=("${FROZEN[@]}");; *) extra=("${FINETUNED[@]}");; esac
  train "${names[$i]}" "${encoders[$i]}" "${extra[@]}" &
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do sleep 2; done
done
wait

echo "== 3/4 evaluate the test split"
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
