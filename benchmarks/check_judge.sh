#!/usr/bin/env bash
# Is the default model fit to label? judge-check on examples/judge_check.jsonl in every labelling
# mode (letters read at once, letters after reasoning, each response scored alone), per category
# and difficulty, and what a judge that only prefers the longer response would score on the set.
#
#   benchmarks/check_judge.sh                 # MODEL=default; the JSON report goes to $WORK
#   MODEL=openai:qwen CAITOOL_BASE_URL=http://gpu1:8000/v1 benchmarks/check_judge.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CAITOOL=${CAITOOL:-.venv/bin/caitool}
WORK=${WORK:-$(mktemp -d)}
MODEL=${MODEL:-default}
SET=${SET:-examples/judge_check.jsonl}
MODES=${MODES:-logprob score cot}
COT_TOKENS=${COT_TOKENS:-64}
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$WORK"

"$PY" - "$SET" <<'PY'
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
longer = sum(len(r["chosen"]) > len(r["rejected"]) for r in rows)
print(f"{sys.argv[1]}: {len(rows)} comparisons; 'the longer response is better' is right on {longer} "
      f"({100 * longer / len(rows):.0f}%)")
PY
mode_args=()
for mode in $MODES; do mode_args+=(--mode "$mode"); done
start=$SECONDS
"$CAITOOL" judge-check "$SET" -m "$MODEL" "${mode_args[@]}" --by category --by difficulty \
    --cot-max-new-tokens "$COT_TOKENS" -o "$WORK/judge-check.json"
echo "judge-check: $((SECONDS - start)) s in all (model loading included); report: $WORK/judge-check.json"
