"""Code blocks of README_ENHANCED_FEATURES.md, for tests that run or compare them as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README_ENHANCED_FEATURES.md"


def code_block(heading: str, language: str) -> str:
    """The first ``language`` fenced block after the line ``heading``."""
    text = README.read_text()
    after = text[text.index(f"\n{heading}\n"):]
    opening = f"```{language}\n"
    body = after[after.index(opening) + len(opening):]
    return body[:body.index("\n```")] + "\n"
