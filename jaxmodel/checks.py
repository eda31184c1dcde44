"""Checks of user input shared by the command line and the packages, each failing with one line.

Inside:
- argparse types that name their range: `positive_int`, `non_negative_int`, `positive_float`,
  `non_negative_float`, `unit_interval` (0 < x <= 1). argparse adds the flag's name to the message
  (`argument --batch-size: must be a positive integer, got 0`), and they run while the command line is
  parsed, before any work.
- `json_problem(e)`, `yaml_problem(e)`: a parser error as `LINE: what (column C)`, without Python's
  wording quirks ("Unterminated string starting at" with its position dropped reads "at at column").
- `check_template(template, name)`: a prompt template must be a format string whose only field is the
  prompt, `{0}` (or `{}`), at least once.
- `close_progress_bars()`: closes every live tqdm bar so that an error printed next starts on its own
  line (a bar's last write ends with a carriage return, not a newline).
"""

from __future__ import annotations

import argparse
import json
import math
import string


def _number(text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text}")
    return value


def unit_interval(text: str) -> float:
    value = _number(text, float)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


# -- parser errors ----------------------------------------------------------------------------------------


def json_problem(e: json.JSONDecodeError) -> str:
    """`LINE: MESSAGE (column C)` for a JSON error (LINE within the text that was parsed)."""
    msg = e.msg.removesuffix(" at").removesuffix(" starting")  # "Unterminated string starting at"
    return f"{e.lineno}: not valid JSON ({msg[:1].lower()}{msg[1:]}, column {e.colno})"


def yaml_problem(e) -> str:
    """`LINE: MESSAGE (column C)` for a PyYAML error, or just the message when it has no position."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
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


def close_progress_bars() -> None:
    """Closes every tqdm bar still open, so that what is printed next starts on a new line."""
    import sys

    bars = set()
    for name in ("tqdm.std", "tqdm.asyncio", "tqdm.auto", "tqdm.notebook"):  # classes keep their own sets
        module = sys.modules.get(name)
        for cls in vars(module).values() if module else ():
            if isinstance(cls, type) and "_instances" in vars(cls):
                bars.update(cls._instances)
    for bar in sorted(bars, key=lambda b: -getattr(b, "pos", 0)):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 (a half-torn-down bar must not hide the error being reported)
            pass
