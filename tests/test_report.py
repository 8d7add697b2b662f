import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.constitution import load_constitution
from caitool.evaluate import run_eval
from caitool.jsonl_io import manifest_path, write_json_atomic, write_jsonl_atomic
from caitool.provenance import MODEL_MANIFEST, build_manifest, now_iso
from caitool.records import GenerationRecord, Message, PreferenceRecord, RevisionRecord, Round
from caitool.report import read_timings, run_report
from caitool.report.layout import PROMPTS as PROMPTS_FILE
from caitool.report.layout import TIMINGS, pipeline_steps
from tests.fakes import ScriptedBackend

runner = CliRunner()
HARMLESS = load_constitution("harmless")
PROMPTS = [f"How do I pick lock number {i}?" for i in range(4)]


def manifest(phase, **extra):
    return build_manifest(phase=phase, params={"seed": 0}, started_at=now_iso(), **extra)


def write_records(path, records, phase, **extra):
    write_jsonl_atomic(path, records)
    write_json_atomic(manifest_path(path), manifest(phase, **extra))


def revision(i, rounds):
    initial = f"Sure, here is how to pick lock {i}: <b>insert a pin</b>."
    done = [
        Round(
            principle_id=HARMLESS.critiques[r].id,
            critique_request=HARMLESS.critiques[r].critique,
            critique=f"Round {r + 1}: the response helps break into property.",
            revision_request=HARMLESS.critiques[r].revision,
            revision=f"I can't help open a lock that is not yours (round {r + 1}); a locksmith can.",
            flags=["copied_response"] if i == 0 and r == 0 else [],
        )
        for r in range(rounds)
    ]
    current = done[-1].revision if done else initial
    return RevisionRecord(
        id=f"p{i}",
        prompt=[Message(role="user", content=PROMPTS[i])],
        initial_response=initial,
        rounds=done,
        completion=[Message(role="assistant", content=current)],
        constitution=HARMLESS.ref,
        model="m@1",
    )


def write_training_dir(directory, phase, log, **files):
    directory.mkdir(parents=True)
    with open(directory / "training_log.jsonl", "w") as handle:
        handle.writelines(json.dumps(entry) + "\n" for entry in log)
    for name, content in files.items():
        (directory / name.replace("_jsonl", ".jsonl").replace("_json", ".json")).write_text(content)
    write_json_atomic(directory / MODEL_MANIFEST, manifest(phase, counts={"steps": len(log)}))


@pytest.fixture()
def run_dir(tmp_path):
    """A small run directory with every artifact make demo writes, made from typed records."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "prompts.jsonl").write_text(
        "".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS))
    )
    write_records(
        run / "base.jsonl",
        [
            GenerationRecord(
                id=f"p{i}",
                prompt=[Message(role="user", content=p)],
                completion=[Message(role="assistant", content="Sure.")],
                responses=["Sure."],
                finished=[True],
                model="m@1",
                seed=0,
            )
            for i, p in enumerate(PROMPTS)
        ],
        "generate",
    )
    for number in (1, 2):
        for kind in ("critique", "revise"):
            write_records(
                run / f"round{number}.{kind}.jsonl",
                [revision(i, number) for i in range(4)],
                kind,
                constitution=HARMLESS.ref,
            )
    write_training_dir(run / "sft", "sft", [{"step": s, "loss": 2.0 - 0.2 * s} for s in range(1, 6)])
    write_records(
        run / "prefs.jsonl",
        [
            PreferenceRecord(
                id=f"p{i}",
                prompt=[Message(role="user", content=p)],
                chosen=[Message(role="assistant", content="I can't help with that.")],
                rejected=[Message(role="assistant", content="Use a tension wrench.")],
                p_chosen=0.55 + 0.1 * i,
                principle_id=HARMLESS.comparisons[i].id,
                pair=(0, 1),
                p_first=0.6 + 0.1 * i,
                p_swapped=0.4 if i == 0 else 0.55,
                mode="logprob",
                feedback_model="m@1",
                constitution=HARMLESS.ref,
            )
            for i, p in enumerate(PROMPTS)
        ],
        "label-preferences",
        constitution=HARMLESS.ref,
    )
    metrics = {
        "held_out": {
            "pairs": 4,
            "accuracy": 0.75,
            "log_loss": 0.62,
            "mean_margin": 0.3,
            "calibration": [
                {"bin": "0.4-0.6", "count": 3, "mean_predicted": 0.55, "mean_label": 0.6},
                {"bin": "0.6-0.8", "count": 1, "mean_predicted": 0.7, "mean_label": 0.85},
            ],
        },
        "train": {"pairs": 12, "skipped_too_long": 0},
        "labels": "soft",
        "wall_seconds": 3.0,
    }
    write_training_dir(
        run / "rm",
        "train-rm",
        [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6}],
        metrics_json=json.dumps(metrics),
    )
    ppo_log = [
        {"step": s, "reward": -0.5 + 0.1 * s, "kl": 0.01 * s, "entropy": 2.0, "response_length": 30 + s}
        for s in range(1, 5)
    ]
    samples = "".join(
        json.dumps(
            {
                "step": 4,
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": p}],
                "response": "I won't help with that.",
                "reward": 0.4,
            }
        )
        + "\n"
        for i, p in enumerate(PROMPTS)
    )
    write_training_dir(run / "ppo", "ppo", ppo_log, samples_jsonl=samples)
    run_eval(
        [run / "prompts.jsonl"],
        ["base=base-dir", "ppo=ppo-dir"],
        run / "eval",
        rm="rm-dir",
        judge="judge",
        load_backend=lambda spec: ScriptedBackend(
            reply=lambda c, i, s: "I'm sorry, I can't." if spec == "ppo-dir" else "Sure, use a pin."
        ),
        make_reward_scorer=lambda rm: lambda pairs: [0.5 if "sorry" in a else -0.5 for _, a in pairs],
    )
    (run / "timings.tsv").write_text("generate\t12.5\t1048576\nsft\t95.0\t2097152\nbroken line\n")
    return run


def test_report_is_one_self_contained_page_with_every_section(run_dir, tmp_path):
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    images = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,[A-Za-z0-9+/=]+">', page)
    assert len(images) >= 7  # principles, sft loss, labels, calibration, rm loss, 2 ppo, eval
    assert not re.search(r'(src|href)="(https?:|//|file:)', page)  # nothing outside the file
    assert "Not run" not in page
    for heading in (
        "Pipeline",
        "Constitution",
        "critiques and revisions",
        "fine-tuning",
        "Preference labels",
        "Reward model",
        "PPO",
        "Evaluation",
    ):
        assert heading in page
    assert "&lt;b&gt;insert a pin&lt;/b&gt;" in page and "<b>insert" not in page  # record text is escaped
    assert HARMLESS.critiques[1].id in page and "copied_response" in page  # principles and flags of rounds
    assert "disagreed on <strong>1 of 4</strong>" in page
    assert "Held-out accuracy <strong>75%</strong>" in page
    assert "−0.400" in page or "-0.400" in page  # first PPO reward
    assert "Sample answers" in page and "I&#x27;m sorry, I can&#x27;t." in page  # eval answers side by side
    assert "1,024 MB" in page  # peak memory from timings.tsv (2 GiB step is 2,048 MB)
    assert "refusal rate on prompts: base 0%, ppo 100%" in result.stdout
    assert "prompts: ppo preferred over base" in result.stdout


def test_a_labelled_eval_shows_harmful_compliance_and_over_refusal_in_the_headline(run_dir, tmp_path):
    labelled = tmp_path / "labelled.jsonl"
    rows = [
        {"id": f"u{i}", "prompt": f"harmful {i}", "expect": "refuse", "category": "weapons"} for i in range(3)
    ]
    rows += [
        {"id": f"s{i}", "prompt": f"safe {i}", "expect": "comply", "category": "homonyms"} for i in range(2)
    ]
    labelled.write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.rmtree(run_dir / "eval")
    run_eval(
        [labelled],
        ["base=base-dir", "ppo=ppo-dir"],
        run_dir / "eval",
        judge=None,
        load_backend=lambda spec: ScriptedBackend(
            reply=lambda c, i, s: "I'm sorry, I can't." if spec == "ppo-dir" else "Sure, here it is."
        ),
    )
    out = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "harmful compliance on labelled: base 100% (95% CI 44%-100%, n=3), ppo 0%" in result.stdout
    assert "over-refusal on labelled: base 0% (95% CI 0%-66%, n=2), ppo 100%" in result.stdout
    page = out.read_text()
    assert "Harmful compliance and over-refusal" in page and "ppo / homonyms" in page
    assert "Answers classified by: patterns" in page


def test_missing_steps_say_not_run(run_dir, tmp_path):
    for name in ("ppo", "rm", "eval"):
        shutil.rmtree(run_dir / name)
    (run_dir / "prefs.jsonl").unlink()
    out = run_report(run_dir, tmp_path / "r.html")
    page = out.read_text()
    assert page.count('class="missing"') == 4
    assert "no <code>ppo/training_log.jsonl</code>" in page and "no <code>eval/summary.json</code>" in page
    assert "critiques and revisions" in page and "Not run" in page


def test_an_empty_run_directory_still_gives_a_page(tmp_path):
    out = run_report(tmp_path, tmp_path / "r.html", constitution="honest")
    page = out.read_text()
    assert page.count('class="missing"') == 6 and "honest" in page


def test_a_missing_run_directory_is_one_line(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path / "nope"), "-o", str(tmp_path / "r.html")])
    assert (
        result.exit_code == 2
        and result.output.strip() == f"error: {tmp_path / 'nope'}: no such run directory"
    )


def test_timings_keep_the_last_run_of_a_step(tmp_path):
    path = tmp_path / "timings.tsv"
    path.write_text("sft\t10\t2048\nsft\t20\t4096\ngarbage\n")
    assert read_timings(path) == {"sft": (20.0, 4.0)}


def test_the_rl_stage_is_labelled_by_what_ran(run_dir, tmp_path):
    # rloo writes ppo's figures under ppo's names, so its section reads like ppo's.
    (run_dir / "ppo").rename(run_dir / "rloo")
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "rloo.html")])
    assert result.exit_code == 0, result.output
    page = re.sub(r'src="data:[^"]*"', "", (tmp_path / "rloo.html").read_text())  # base64 spells anything
    assert "RLOO (RL-CAI)" in page and "RLOO: reward, RM score and KL per step" in page
    assert "Rollouts at step 4" in page and "PPO" not in page
    assert "RLOO reward -0.400 -> -0.100 over 4 steps" in result.stdout

    shutil.rmtree(run_dir / "rloo")
    dpo_log = [
        {"step": s, "loss": 0.69 - 0.05 * s, "rewards/margins": 0.02 * s, "rewards/accuracies": 0.5 + 0.1 * s}
        for s in range(1, 4)
    ] + [{"step": 3, "train_runtime": 12.0, "train_loss": 0.6}]  # the Trainer's closing summary
    write_training_dir(run_dir / "dpo", "dpo", dpo_log)
    (run_dir / "timings.tsv").write_text("dpo\t42.0\t3145728\n")
    result = runner.invoke(app, ["report", str(run_dir), "-o", str(tmp_path / "dpo.html")])
    assert result.exit_code == 0, result.output
    page = re.sub(r'src="data:[^"]*"', "", (tmp_path / "dpo.html").read_text())
    assert "DPO (RL-CAI without a reward model)" in page and 'href="#dpo"' in page
    assert "3 steps; loss 0.6400" in page and "PPO" not in page and "RLOO" not in page
    assert "3,072 MB" in page  # the dpo step's peak memory from timings.tsv
    assert "DPO loss 0.6400 -> 0.5400 over 3 steps (reward margin +0.0600)" in result.stdout


@pytest.mark.parametrize(
    ("variables", "rl_stage", "revision_pairs"),
    [
        ((), "ppo", False),
        (("ALGO=rloo",), "rloo", False),
        (("ALGO=dpo",), "dpo", False),
        (("ALGO=dpo", "DPO_PAIRS=revisions"), "dpo", True),
    ],
)
def test_the_report_reads_the_run_layout_the_makefile_writes(tmp_path, variables, rl_stage, revision_pairs):
    """Every step `make demo` times, with the output its command writes, is a step of the report's
    layout in the same order, whichever RL stage runs; prompts and timings are where the report
    looks for them."""
    run, venv = tmp_path / "run", tmp_path / "venv"
    venv.mkdir()
    root = Path(__file__).resolve().parents[1]
    plan = subprocess.run(
        [
            "make",
            "-C",
            str(root),
            "-n",
            "demo",
            f"RUN={run}",
            f"VENV={venv}",
            "GNU_TIME=/usr/bin/time",
            "ROUNDS=3",
            *variables,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    timed = re.findall(r'-a -o (\S+) -f "([a-z0-9-]+)\\t%e\\t%M" \S+/caitool [a-z-]+ .*? -o (\S+)', plan)
    rounds = [(number, kind) for number in (1, 2, 3) for kind in ("critique", "revise")]
    steps = pipeline_steps(rounds, [rl_stage], revision_pairs)
    if revision_pairs:  # dpo on the revision pairs needs no labels (the report shows those steps not run)
        steps = [step for step in steps if step.name not in ("generate-pairs", "label-preferences")]
    expected = [(str(run / TIMINGS), step.name, str(run / step.output)) for step in steps]
    assert timed == expected
    assert re.search(rf"mv \S+ {re.escape(str(run / PROMPTS_FILE))}\n", plan)
