from caitool.pipeline import Runtime
from caitool.processes import Processes
from caitool.trainers import trainer_arguments
from caitool.training import training_params, training_run_key


def test_a_trainer_saves_checkpoints_only_when_asked_and_keeps_the_last():
    never = trainer_arguments(Runtime(seed=3), "cpu")
    assert never["save_strategy"] == "no" and never["seed"] == never["data_seed"] == 3
    every_two = trainer_arguments(Runtime(checkpoint_every=2), "cpu")
    assert every_two["save_strategy"] == "steps" and every_two["save_steps"] == 2
    assert every_two["save_total_limit"] == 1 and every_two["use_cpu"] is True


def test_how_often_a_run_saves_is_in_its_manifest_but_not_in_its_run_key(tmp_path):
    data = tmp_path / "in.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    settings = {"lr": 1e-5}
    key = training_run_key(data, {}, settings, 0, processes=1)
    assert set(key) == {"input", "lr", "seed", "processes"}
    params = training_params(settings, Runtime(checkpoint_every=5), None, Processes(), device="cpu")
    assert params == {
        "lr": 1e-5,
        "seed": 0,
        "processes": 1,
        "checkpoint_every": 5,
        "device": "cpu",
        "resumed_from": None,
    }


def test_cpu_training_arguments_are_ones_the_installed_transformers_takes(tmp_path):
    """transformers 5.2x renamed gradient_checkpointing; vLLM's pins (caitool[vllm]) keep it below 5.20."""
    from transformers import TrainingArguments

    from caitool.trainers import cpu_training_kwargs

    arguments = TrainingArguments(output_dir=str(tmp_path), **cpu_training_kwargs("cpu"))
    assert arguments.use_cpu
