#!/usr/bin/env bash
# The RL phase of Constitutional AI (RLAIF) on the example red-team prompts:
#   generate -n 2 -> label-preferences -> train-rm -> ppo
# Sized for 2 CPU cores with the default model (about 10 minutes); every size is a variable:
#   POLICY=runs/demo/sft OUT=runs/demo/rl examples/rl_cai.sh
set -euo pipefail

CAITOOL=${CAITOOL:-caitool}
POLICY=${POLICY:-default}            # the model being aligned: the SFT output, or "default"
FEEDBACK=${FEEDBACK:-default}        # the feedback model that labels the pairs
CONSTITUTION=${CONSTITUTION:-harmless}
PROMPTS=${PROMPTS:-examples/red_team.jsonl}
OUT=${OUT:-runs/rl}
NUM_PROMPTS=${NUM_PROMPTS:-16}       # prompts taken from the top of PROMPTS
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-48}
RM_EPOCHS=${RM_EPOCHS:-2}
RM_LR=${RM_LR:-5e-5}
PPO_STEPS=${PPO_STEPS:-4}
PPO_BATCH=${PPO_BATCH:-4}
RESPONSE_LENGTH=${RESPONSE_LENGTH:-32}
SEED=${SEED:-0}

mkdir -p "$OUT"
head -n "$NUM_PROMPTS" "$PROMPTS" > "$OUT/prompts.jsonl"

timed() {
    local label=$1
    shift
    local start=$SECONDS
    "$@"
    echo "[rl_cai] $label: $((SECONDS - start)) s" >&2
}

timed "generate" "$CAITOOL" generate "$OUT/prompts.jsonl" -o "$OUT/pairs.jsonl" --model "$POLICY" \
    -n 2 --temperature 1.0 --max-new-tokens "$MAX_NEW_TOKENS" --batch-size 8 --seed "$SEED"
timed "label-preferences" "$CAITOOL" label-preferences "$OUT/pairs.jsonl" -o "$OUT/prefs.jsonl" \
    --model "$FEEDBACK" --constitution "$CONSTITUTION" --batch-size 8 --seed "$SEED"
timed "train-rm" "$CAITOOL" train-rm "$OUT/prefs.jsonl" -o "$OUT/rm" --model "$POLICY" \
    --epochs "$RM_EPOCHS" --lr "$RM_LR" --eval-fraction 0.25 --batch-size 4 --seed "$SEED"
timed "ppo" "$CAITOOL" ppo "$OUT/prompts.jsonl" --policy "$POLICY" --rm "$OUT/rm" -o "$OUT/policy" \
    --steps "$PPO_STEPS" --batch-size "$PPO_BATCH" --mini-batches 2 --ppo-epochs 1 \
    --response-length "$RESPONSE_LENGTH" --lr 1e-6 --kl-coef 0.05 --sample-every 2 --seed "$SEED"
