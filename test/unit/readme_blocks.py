"""Code blocks of README_ENHANCED_FEATURES.md, for tests that run or compare them as written."""

from __future__ import annotations

from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README_ENHANCED_FEATURES.md"


def code_block(line_start: str, language: str) -> str:
    """The first ``language`` fenced block after the first line that starts with ``line_start``."""
    text = README.read_text()
    after = text[text.index(f"\n{line_start}"):]
    opening = f"```{language}\n"
    body = after[after.index(opening) + len(opening):]
    return body[:body.index("\n```")] + "\n"
