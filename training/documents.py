"""Reading documents from text files, shared by the tokenizer trainer and the data pipeline.

Inside: `DataError` (a mistake in the user's inputs, reported as one line), `iter_documents(path)`.

File formats, chosen by extension (letter case ignored):
- `.jsonl`: one document per line, from its string field `text`; blank lines are skipped. A line that
  is not a JSON object with a string `text` is an error naming the file and line, never skipped:
  silently dropping data hides a broken export.
- anything else (`.txt`, ...): plain UTF-8 text, one document per block of lines separated by one or
  more blank (or whitespace-only) lines. Newlines inside a block are kept.
Empty documents (empty `text`, or a block of only whitespace) are skipped: they would train nothing
but `<s></s>`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

from jaxmodel.checks import json_problem


class DataError(ValueError):
    """A mistake in the user's inputs (bad file contents, bad arguments), printed as one line."""


def iter_documents(path: str) -> Iterator[str]:
    """Yield the documents of one file (see the module docstring for the formats)."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a .jsonl or text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        yield from _jsonl_documents(path) if path.lower().endswith(".jsonl") else _text_documents(path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None


def _jsonl_documents(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}:{json_problem(e).partition(':')[2]}") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f"{path}:{number}: expected a JSON object with a string field 'text'")
            if text.strip():
                yield text


def text_blocks(lines) -> Iterator[str]:
    """Documents of a plain-text file's lines: runs of non-blank lines, split by blank lines."""
    block: list[str] = []
    for line in lines:
        if line.strip():
            block.append(line.rstrip("\n"))
        elif block:
            yield "\n".join(block)
            block = []
    if block:
        yield "\n".join(block)


def _text_documents(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        yield from text_blocks(f)
