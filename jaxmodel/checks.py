"""Checks of user input shared by the command line and the packages, each failing with one line.

Inside:
- `json_problem(e)`, `yaml_problem(e)`: a parser error as `LINE: what (column C)`, without Python's
  wording quirks ("Unterminated string starting at" with its position dropped reads "at at column").
- `check_template(template, name)`: a prompt template must be a format string whose only field is the
  prompt, `{0}` (or `{}`), at least once.
- `check_new_output(path, flag, overwrite=..., inputs=...)`: an output file is never one of the command's
  inputs (compared as files: another spelling, a symlink or a hard link of the input is the input), and
  an existing one is replaced only when asked (`--overwrite`).
- `is_utf8(text)`: False for a str that UTF-8 cannot encode (a lone surrogate: from JSON's `\ud800`, or a
  command-line argument holding bytes that were not UTF-8).
- `memory_amount(value)`: a KV cache size as bytes (123456, "512MiB", "4GiB", "2GB") or a fraction in (0, 1]
  of free device memory (0.9), or a ValueError saying what is expected.
"""

from __future__ import annotations

import json
import os
import re
import string

from jaxmodel import storage


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- parser errors ----------------------------------------------------------------------------------------


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def memory_amount(value) -> int | float:
    """Bytes (an int >= 1: 123456, "512MiB", "4GiB", "1.5GB") or a fraction of free memory (a float in
    (0, 1]: 0.9); a ValueError naming what is expected otherwise. A number with a point below or at 1 is a
    fraction; a whole number is bytes (so 1 is one byte, 1.0 all free memory)."""
    expected = f"expected bytes (e.g. 4GiB, 512MiB, 123456) or a fraction of free memory in (0, 1], got {value!r}"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        if value < 1:
            raise ValueError(expected)
        return value
    if isinstance(value, float):
        if not 0 < value <= 1:
            raise ValueError(expected)
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", str(value))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(expected)
    number, unit = m.group(1), m.group(2).lower()
    if not unit and "." in number:
        if not 0 < float(number) <= 1:
            raise ValueError(expected)
        return float(number)
    nbytes = float(number) * _UNITS[unit]
    if nbytes < 1 or not nbytes.is_integer() and unit in ("", "b"):
        raise ValueError(expected)
    return int(nbytes)


def json_problem(e: json.JSONDecodeError) -> str:
    """`LINE: MESSAGE (column C)` for a JSON error (LINE within the text that was parsed)."""
    msg = e.msg.removesuffix(" at").removesuffix(" starting")  # "Unterminated string starting at"
    return f"{e.lineno}: not valid JSON ({msg[:1].lower()}{msg[1:]}, column {e.colno})"


def yaml_problem(e) -> str:
    """`LINE: MESSAGE (column C)` for a PyYAML error, or just the message when it has no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = "; ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    what = what or str(e).splitlines()[0]
    if mark is None:
        return f"not valid YAML ({what})"
    return f"{mark.line + 1}: not valid YAML ({what}, column {mark.column + 1})"


# -- prompt templates -------------------------------------------------------------------------------------


class TemplateError(ValueError):
    """A prompt template that would not place the prompt (one line naming the template)."""


def check_template(template: str, name: str = "template") -> str:
    """Returns `template` if `template.format(prompt)` puts the prompt in it; else a TemplateError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # "{0" or "}{"
        raise TemplateError(f"{name} {template!r}: not a format string ({e}); write a literal brace as "
                            "{{ or }}") from None
    for field in fields:
        base = field.split(".", 1)[0].split("[", 1)[0]
        if base not in ("", "0"):
            raise TemplateError(f"{name} {template!r}: unknown field {{{field}}}; the prompt is {{0}} "
                                "(write a literal brace as {{ or }})")
    if not fields:
        raise TemplateError(f"{name} {template!r} has no {{0}} placeholder: the prompt would be dropped")
    try:
        template.format("")
    except (ValueError, IndexError, KeyError, AttributeError, TypeError) as e:
        raise TemplateError(f"{name} {template!r}: {e}") from None
    return template


# -- output files -----------------------------------------------------------------------------------------


class OutputError(storage.StorageError):
    """An output path that would destroy something (one line naming the flag and the path; a StorageError,
    so the CLI prints it as `normistral: error: ...`)."""


def same_file(a, b) -> bool:
    """True if paths `a` and `b` name one file: compared by identity (device, inode) when both exist
    locally, so a symlink or a hard link counts; else by their canonical spelling (a URL as written)."""
    if not storage.is_remote(a) and not storage.is_remote(b) and os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return storage.resolve(a) == storage.resolve(b)


def check_new_output(path, flag: str, *, overwrite: bool = False, inputs: dict[str, str] | None = None) -> None:
    """Refuses output `path` (given as `flag`) if it is one of `inputs` ({flag: path}) or, without
    `overwrite`, if it exists. Runs before any work, so a refused command has touched nothing."""
    for input_flag, input_path in (inputs or {}).items():
        if input_path is not None and same_file(path, input_path):
            raise OutputError(f"{flag} {os.fspath(path)} is the {input_flag} file: writing it would destroy the input")
    if not overwrite and storage.isfile(path):
        raise OutputError(f"{flag} {os.fspath(path)} exists; pass --overwrite to replace it (or choose a new name)")

