#!/usr/bin/env bash
# The Deep-versus-Wide study on the bundled mini corpus, on a CPU (docs/papers.md#deep-versus-wide):
#   1. MFCC k-means targets and a small HuBERT teacher (as examples/mini/run.sh)  -> OUT/labels, OUT/teacher
#   2. fairseq-kd-family: one student per depth at one transformer budget       -> OUT/family/*.yaml
#   3. every member distilled on the same data, same updates, side by side      -> OUT/<member>/
#   4. fairseq-kd-analyze on all of them (CKA maps, cosine, probes)             -> OUT/analysis/
#   5. one comparison table                                                     -> OUT/results.md
#   bash examples/deep_vs_wide/run.sh [--quick]     DEPTHS="2 4 8" BUDGET=2e5 OUT=dir to change
set -euo pipefail
set -f
QUICK=0
[ "${1:-}" = "--quick" ] && QUICK=1
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="$(cd "${DATA:-$REPO/manifests}" && pwd)"
OUT="${OUT:-$REPO/runs/deep_vs_wide}"
DEPTHS="${DEPTHS:-2 4 8}"
BUDGET="${BUDGET:-2e5}"  # transformer parameters, shrunk to CPU size (the paper: 21.3e6)
if [ "$QUICK" = 1 ]; then U_TEACHER=150 U_DISTIL=100 STEPS=100; else U_TEACHER=1000 U_DISTIL=300 STEPS=300; fi
BIN="$REPO/.venv/bin"; [ -x "$BIN/fairseq-hydra-train" ] || BIN="$(dirname "$(command -v python)")"
CPU=(common.fp16=false distributed_training.distributed_world_size=1 dataset.num_workers=0)
mkdir -p "$OUT"; OUT="$(cd "$OUT" && pwd)"; SECONDS=0
step() { printf '\n== [%4ds] %s\n' "$SECONDS" "$*"; }

step "1 teacher: MFCC k-means targets + fairseq hubert_pretraining (3 x 96, $U_TEACHER updates)"
[ -f "$OUT/labels/train.km" ] || "$BIN/fairseq-kd-mfcc-kmeans" --manifest-dir "$DATA" --splits train valid \
  --n-clusters 50 --n-init 4 --out-dir "$OUT/labels"
[ -f "$OUT/teacher/checkpoint_last.pt" ] || "$BIN/fairseq-hydra-train" --config-name hubert_mini_teacher \
  "task.data=$DATA" "task.label_dir=$OUT/labels" "optimization.max_update=$U_TEACHER" \
  "lr_scheduler.warmup_updates=$((U_TEACHER * 2 / 25))" "dataset.validate_interval_updates=$U_TEACHER" \
  "checkpoint.save_interval_updates=$U_TEACHER" "checkpoint.save_dir=$OUT/teacher" "hydra.run.dir=$OUT/teacher" \
  > "$OUT/teacher.log" 2>&1
TEACHER="$OUT/teacher/checkpoint_last.pt"

step "2 family: depths $DEPTHS at $BUDGET transformer parameters"
"$BIN/fairseq-kd-family" --teacher "$TEACHER" --budget "$BUDGET" --depths $DEPTHS --out "$OUT/family" \
  > "$OUT/family.md" 2> "$OUT/family.err" || { grep error "$OUT/family.err"; exit 1; }
cat "$OUT/family.md"
MEMBERS=$("$BIN/python" -c "import json,sys; print(' '.join(m['name'] for m in json.load(open(sys.argv[1]))['members']))" "$OUT/family/family.json")

step "3 distil every member, $U_DISTIL updates each, same data and schedule"
pids=()
for name in $MEMBERS; do
  [ -f "$OUT/$name/checkpoint_last.pt" ] && continue
  (export OMP_NUM_THREADS=1; "$BIN/fairseq-hydra-train" --config-dir "$OUT/family" --config-name "$name" \
    "task.data=$DATA" "task.teacher_path=$TEACHER" "${CPU[@]}" task.max_sample_size=48000 dataset.batch_size=8 \
    optimization.update_freq=[1] optimization.lr=[0.002] "optimization.max_update=$U_DISTIL" \
    "lr_scheduler.warmup_updates=$((U_DISTIL / 10))" common.log_interval=50 dataset.validate_interval=1000 \
    "dataset.validate_interval_updates=$U_DISTIL" "checkpoint.save_interval_updates=$U_DISTIL" \
    "checkpoint.save_dir=$OUT/$name" "hydra.run.dir=$OUT/$name" > "$OUT/$name.log" 2>&1 \
    || { echo "[$name] failed, see $OUT/$name.log"; exit 1; }) & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done

step "4 analyse (train split: probes train on every other utterance of each speaker)"
STUDENTS=(); for name in $MEMBERS; do STUDENTS+=(--student "$name=$OUT/$name/checkpoint_last.pt"); done
"$BIN/fairseq-kd-analyze" --teacher "$TEACHER" --manifest "$DATA/train.tsv" "${STUDENTS[@]}" \
  --probe-steps "$STEPS" --cosine-utterances 24 --out "$OUT/analysis" 2>/dev/null | grep -v "^fairseq-kd-analyze:"

step "5 comparison table -> $OUT/results.md"
"$BIN/python" - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
family = json.load(open(f"{out}/family/family.json"))
analysis = json.load(open(f"{out}/analysis/analysis.json"))
rows = ["| model | layers x width (FFN) | KD | transformer params | params | GMACs / 10 s | CKA last layer vs teacher last | mean cosine to targets | best content CER (layer) | best speaker acc (layer) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
def best(values, lower):
    pick = min if lower else max
    i = pick(range(len(values)), key=lambda k: values[k])
    return f"{values[i]:.3f} ({i})"
t = analysis["models"]["teacher"]
rows.append(f"| teacher | {t['layers']} layers | - | - | - | - | 1 | - | {best(t['content_error'], True)} | {best(t['speaker_accuracy'], False)} |")
for m in family["members"]:
    a = analysis["models"][m["name"]]
    cos = sum(a["cosine"].values()) / len(a["cosine"])
    rows.append(f"| {m['name']} | {m['depth']} x {m['width']} ({m['ffn']}) | {m['method'].upper()} | {m['transformer_params']:,} | "
                f"{m['params']:,} | {m['macs_per_10s'] / 1e9:.2f} | {a['cka'][-1][-1]:.3f} | {cos:.3f} | "
                f"{best(a['content_error'], True)} | {best(a['speaker_accuracy'], False)} |")
open(f"{out}/results.md", "w").write("\n".join(rows) + "\n")
print("\n".join(rows))
PY
step "done: $OUT/results.md, $OUT/analysis/{cka_*.png,cosine.png,probes.png,analysis.json}"
