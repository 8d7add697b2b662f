from caitool.progress import PhaseProgress, summary_line


def test_summary_reports_token_rate_only_for_phases_that_generate():
    generating = PhaseProgress(None, None, total=2, already_done=0)
    generating.advance(2, tokens=64)
    line = summary_line("generate", generating, output="out.jsonl")
    assert line.startswith("generate: 2 records in ") and "rec/s, " in line and "tok/s" in line
    assert line.endswith("; output: out.jsonl")

    labelling = PhaseProgress(None, None, total=2, already_done=1)
    labelling.advance(1)
    line = summary_line("label-preferences", labelling)
    assert "rec/s)" in line and "tok/s" not in line
    assert "1 resumed from a previous run" in line
