import pytest
from typer.testing import CliRunner

from caitool.cli import app
from caitool.constitution import load_constitution
from tests.conftest import REPO

runner = CliRunner()


@pytest.mark.parametrize("name", ["harmless", "honest"])
def test_bundled_constitutions_are_valid_and_cover_both_phases(name):
    constitution = load_constitution(name)
    assert constitution.critiques and constitution.comparisons
    assert constitution.few_shot.critique and constitution.few_shot.comparison


def test_default_constitution_meets_the_minimums_and_covers_the_themes():
    constitution = load_constitution("harmless")
    assert len(constitution.critiques) >= 12 and len(constitution.comparisons) >= 12
    ids = " ".join(p.id for p in constitution.critiques)
    for theme in ("harm", "illegal", "danger", "toxic", "racism", "sexism", "privacy", "honest", "manipul"):
        assert theme in ids, theme
    assert "refusal" in ids or "preach" in ids


def test_hash_changes_with_content(tmp_path):
    source = load_constitution("honest")
    edited = tmp_path / "c.yaml"
    import yaml

    data = source.model_dump(mode="json")
    data["critiques"][0]["critique"] += " Be specific."
    edited.write_text(yaml.safe_dump(data))
    assert load_constitution(edited).content_hash != source.content_hash
    assert load_constitution(edited).ref.name == "honest"


BASE = """\
name: t
version: "1"
critiques:
  - {id: a, critique: "Critique it.", revision: "Rewrite it."}
comparisons:
  - {id: c, text: "Which is better?"}
"""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (BASE + "  - {id: c, text: 'Again?'}\n", 'comparisons[1].id: duplicate id "c"'),
        (BASE.replace("Critique it.", "  "), "critiques[0].critique: must not be empty"),
        (BASE + "colour: red\n", 'unknown key "colour"'),
        (BASE.replace('version: "1"', "version: 1"), "version: Input should be a valid string"),
        (BASE.replace("name: t\n", ""), 'missing key "name"'),
        ("name: [unclosed\n", "invalid YAML"),
        (
            BASE + "few_shot:\n  comparison:\n    - {principle: zz, conversation: [{role: user, content: q}],"
            " options: [x, y], answer: A}\n",
            'unknown comparison id "zz"',
        ),
    ],
)
def test_check_reports_one_clear_line_and_exit_2(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["constitution", "check", str(path)])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output


def test_check_and_show_on_a_valid_file():
    result = runner.invoke(app, ["constitution", "check", str(REPO / "constitutions" / "harmless.yaml")])
    assert result.exit_code == 0 and result.output.startswith("ok: harmless")
    shown = runner.invoke(app, ["constitution", "show", "honest"])
    assert shown.exit_code == 0 and "no-fabrication" in shown.output
