#!/usr/bin/env bash
# Kill a real `caitool ppo` run with SIGKILL and resume it; check it ends where an uninterrupted run ends.
#
# Policy: the default model. Reward model: the default backbone with a seeded random scalar
# head (enough to drive PPO; no labels needed). Prints the step lines of both runs, the
# checkpoint size and the largest weight difference between the two final policies.
#
#   benchmarks/check_ppo_resume.sh            # work files under $WORK (default: a temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CAITOOL=${CAITOOL:-.venv/bin/caitool}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$WORK"

"$PY" - "$WORK/rm" <<'PY'
import sys

import torch
from transformers import AutoModelForSequenceClassification

from caitool.models import load_tokenizer, model_info
from caitool.reward import prepare_reward_tokenizer

info = model_info("default")
torch.manual_seed(0)
model = AutoModelForSequenceClassification.from_pretrained(info.path, num_labels=1)
tokenizer = load_tokenizer(info.path)
prepare_reward_tokenizer(tokenizer, model)
model.save_pretrained(sys.argv[1])
tokenizer.save_pretrained(sys.argv[1])
PY
head -16 examples/red_team.jsonl > "$WORK/prompts.jsonl"
args=("$WORK/prompts.jsonl" --policy default --rm "$WORK/rm" --steps 4 --batch-size 4 --response-length 24
      --value-model separate)

"$CAITOOL" ppo "${args[@]}" -o "$WORK/straight" 2> "$WORK/straight.log"

"$CAITOOL" ppo "${args[@]}" -o "$WORK/resumed" --checkpoint-every 1 2> "$WORK/killed.log" &
pid=$!
until grep -q "ppo step 3/4" "$WORK/killed.log"; do sleep 0.5; done
kill -9 "$pid"
wait "$pid" 2>/dev/null || true
echo "killed after step 3 was logged; checkpoints left: $(ls "$WORK/.resumed.partial/checkpoints")"
du -sh "$WORK/.resumed.partial/checkpoints/"checkpoint-*

"$CAITOOL" ppo "${args[@]}" -o "$WORK/resumed" --checkpoint-every 1 2> "$WORK/resumed.log"

echo "== uninterrupted"; grep "^ppo step" "$WORK/straight.log"
echo "== killed"; grep "^ppo" "$WORK/killed.log"
echo "== resumed"; grep "^ppo" "$WORK/resumed.log"
"$PY" - "$WORK" <<'PY'
import sys

from safetensors.torch import load_file

work = sys.argv[1]
straight = load_file(f"{work}/straight/model.safetensors")
resumed = load_file(f"{work}/resumed/model.safetensors")
largest = max((straight[name] - resumed[name]).abs().max().item() for name in straight)
print(f"largest weight difference, uninterrupted vs killed-and-resumed: {largest}")
PY
