from caitool.run_key import KeyFile, differing_settings


def test_differing_settings_names_changed_added_and_dropped_keys():
    recorded = {"lr": 1e-5, "seed": 0, "flags": ["a"], "gone": 1}
    assert differing_settings(recorded, {"lr": 1e-5, "seed": 1, "flags": ("a",), "new": 2}) == [
        "gone",
        "new",
        "seed",
    ]  # a tuple equals the list it reads back as


def test_a_key_file_compares_a_new_run_with_the_recorded_one(tmp_path):
    key = KeyFile(tmp_path / "out.part.key.json")
    assert key.read() is None and key.differences({"seed": 0}) is None and not key.matches({"seed": 0})
    key.write({"seed": 0, "exclude": ("x",)})
    assert key.matches({"seed": 0, "exclude": ["x"]}) and key.differences({"seed": 1, "exclude": ["x"]}) == [
        "seed"
    ]
    key.path.write_text('{"seed": ')  # torn by a kill: as if nothing was recorded
    assert key.read() is None
    key.remove()
    assert not key.path.exists()
