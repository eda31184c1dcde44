"""Checks of user input shared by the command line and the packages, each failing with one line.

Inside:
- `json_problem(e)`, `yaml_problem(e)`: a parser error as `LINE: what (column C)`, without Python's
  wording quirks ("Unterminated string starting at" with its position dropped reads "at at column").
- `check_template(template, name)`: a prompt template must be a format string whose only field is the
  prompt, `{0}` (or `{}`), at least once.
"""

from __future__ import annotations

import json
import string

# -- parser errors ----------------------------------------------------------------------------------------


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
