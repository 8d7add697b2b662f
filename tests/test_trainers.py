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
