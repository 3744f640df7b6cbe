"""Fenced code blocks of the docs' Markdown pages, and the textual substitutions that make them cheap to run in tests."""

from __future__ import annotations

from pathlib import Path


def code_blocks(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line of the fence, language, code, the line above the fence)`` for every fenced block of a Markdown page."""
    lines, blocks, i = path.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            blocks.append((i + 1, lines[i][3:].strip(), "\n".join(lines[i + 1 : end]), lines[i - 1] if i else ""))
            i = end
        i += 1
    return blocks


def apply_once(codes: list[str], substitutions: list[tuple[str, str]], where: str) -> list[str]:
    """``codes`` with each ``(old, new)`` applied; ``old`` must occur exactly once in all of them together (text outside the
    code that runs does not count), so an edit of a command fails the test instead of silently running it at full size."""
    out = list(codes)
    for old, new in substitutions:
        count = sum(code.count(old) for code in out)
        assert count == 1, f"substitution {old!r} matched {count} times in the code that runs (expected once): update {where} with the page"
        hit = next(i for i, code in enumerate(out) if old in code)
        out[hit] = out[hit].replace(old, new)
    return out
