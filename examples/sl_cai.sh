#!/usr/bin/env bash
# Supervised Constitutional AI (SL-CAI) end to end on a small slice of the example prompts:
#   prompts -> critique -> revise -> critique -> revise -> sft, then before/after answers.
#
# Sized to finish in a few minutes on 2 CPU cores with the default 135M model. Every step
# writes its output atomically and is skipped when that output already exists, so a killed
# run is continued by running the script again (delete $OUT to start over).
#
# Override any variable from the environment, e.g.
#   N_PROMPTS=24 ROUNDS=4 MODEL=path/to/model OUT=runs/big bash examples/sl_cai.sh
set -euo pipefail

CAITOOL=${CAITOOL:-caitool}
MODEL=${MODEL:-default}
CONSTITUTION=${CONSTITUTION:-harmless}
PROMPTS=${PROMPTS:-examples/red_team.jsonl}
HELPFUL=${HELPFUL:-examples/helpful.jsonl}
HELD_OUT=${HELD_OUT:-examples/eval_red_team.jsonl}
OUT=${OUT:-runs/sl_cai}
N_PROMPTS=${N_PROMPTS:-8}
N_HELD_OUT=${N_HELD_OUT:-3}
ROUNDS=${ROUNDS:-2}
MAX_NEW=${MAX_NEW:-96}
FEW_SHOT=${FEW_SHOT:-1}
EPOCHS=${EPOCHS:-2}
LR=${LR:-1e-4}
SEED=${SEED:-0}
# Revisions that talk about "the response" instead of rewriting it are poor targets for a small model.
EXCLUDE_FLAG=${EXCLUDE_FLAG:-revision-is-critique}

mkdir -p "$OUT"
step() { printf '\n== %s\n' "$*" >&2; }
run_once() {  # run_once OUTPUT command...: skip a step whose output is already complete
  local output=$1
  shift
  if [ -e "$output" ]; then echo "(done already: $output)" >&2; else "$@"; fi
}

head -n "$N_PROMPTS" "$PROMPTS" >"$OUT/prompts.jsonl"
head -n "$N_HELD_OUT" "$HELD_OUT" >"$OUT/held_out.jsonl"
generation=(--model "$MODEL" --constitution "$CONSTITUTION" --max-new-tokens "$MAX_NEW" --few-shot "$FEW_SHOT"
  --batch-size 8 --seed "$SEED")

current="$OUT/prompts.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  step "round $round: critique"
  run_once "$OUT/round$round.critique.jsonl" \
    "$CAITOOL" critique "$current" -o "$OUT/round$round.critique.jsonl" "${generation[@]}"
  step "round $round: revise"
  run_once "$OUT/round$round.revise.jsonl" \
    "$CAITOOL" revise "$OUT/round$round.critique.jsonl" -o "$OUT/round$round.revise.jsonl" "${generation[@]}"
  current="$OUT/round$round.revise.jsonl"
done

step "sft on the final revisions, mixed with helpful examples"
run_once "$OUT/sft" \
  "$CAITOOL" sft "$current" -o "$OUT/sft" --model "$MODEL" --mix "$HELPFUL" --epochs "$EPOCHS" --lr "$LR" \
  --exclude-flag "$EXCLUDE_FLAG" --batch-size 4 --max-length 512 --seed "$SEED"

step "before/after on $N_HELD_OUT held-out prompts (greedy)"
for name in base sft; do
  model_dir=$MODEL
  [ "$name" = sft ] && model_dir="$OUT/sft"
  run_once "$OUT/held_out.$name.jsonl" \
    "$CAITOOL" generate "$OUT/held_out.jsonl" -o "$OUT/held_out.$name.jsonl" --model "$model_dir" \
    --temperature 0 --max-new-tokens "$MAX_NEW" --seed "$SEED"
done

python3 - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
before = [json.loads(line) for line in (out / "held_out.base.jsonl").open()]
after = {r["id"]: r for r in map(json.loads, (out / "held_out.sft.jsonl").open())}
for record in before:
    print(f"\n### {record['prompt'][-1]['content']}")
    print(f"before: {record['responses'][0]}")
    print(f"after:  {after[record['id']]['responses'][0]}")
PY
