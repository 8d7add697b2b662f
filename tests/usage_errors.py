"""Reading Typer's usage errors, which rich draws in a box wrapped at the terminal's width."""

import re


def unboxed(output: str) -> str:
    """The output's words joined by single spaces, without the box around the error message."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())
