import pytest

from caitool.backends import SamplingParams
from caitool.backends.local import TransformersBackend
from caitool.records import Message
from tests.conftest import SAMPLING_DISTORTIONS

CONVERSATIONS = [
    [Message(role="user", content="How do I bake bread?")],
    [Message(role="user", content="Tell me a joke about safety and kindness.")],
]


def backend_for(directory):
    return TransformersBackend.load(str(directory), batch_size=2, device="cpu")


def test_the_distorting_config_changes_what_transformers_alone_would_draw(
    tiny_model_dir, penalised_model_dir
):
    """The premise of the tests below: transformers applies these settings unless told otherwise."""
    import torch

    plain, penalised = backend_for(tiny_model_dir), backend_for(penalised_model_dir)
    inputs = plain.tokenizer("How do I bake bread?", return_tensors="pt")
    outputs = []
    for backend in (plain, penalised):
        torch.manual_seed(0)
        outputs.append(
            backend.model.generate(**inputs, do_sample=True, temperature=1.0, top_p=1.0, max_new_tokens=12)
        )
    assert not torch.equal(*outputs)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_local_generation_ignores_the_models_sampling_settings(
    tiny_model_dir, penalised_model_dir, temperature
):
    params = SamplingParams(temperature=temperature, top_p=1.0, max_new_tokens=12, n=2)
    plain = backend_for(tiny_model_dir).generate(CONVERSATIONS, params, seed=3)
    penalised = backend_for(penalised_model_dir).generate(CONVERSATIONS, params, seed=3)
    assert penalised == plain


def test_the_models_generation_config_is_left_as_it_was(penalised_model_dir):
    backend = backend_for(penalised_model_dir)
    backend.generate(CONVERSATIONS, SamplingParams(temperature=1.0, max_new_tokens=4), seed=0)
    config = backend.model.generation_config
    assert {key: getattr(config, key) for key in SAMPLING_DISTORTIONS} == SAMPLING_DISTORTIONS
