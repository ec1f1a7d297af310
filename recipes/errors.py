"""Bad input: one clear message that names the value and the fix, exit status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

from pydantic import ValidationError

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """Raised for anything the user can fix (environment, recipe, override, GPU count).

    The command line prints `error: <message>` and exits with status 2, without a traceback.
    """


def closest(word: str, candidates: Iterable[str]) -> str:
    """' (did you mean X?)' for the nearest candidate, or '' when none is near."""
    match = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _dotted(loc: tuple) -> str:
    # Union members show up in pydantic's location as type names; they mean nothing to a user.
    parts = [str(p) for p in loc if not (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))]
    return ".".join(parts) or "(top level)"


_TYPE_TAGS = {"bool", "int", "float", "str"}


def format_validation_error(error: ValidationError, source: str, known_keys: dict[str, list[str]]) -> str:
    """Turn pydantic's errors into lines of `field = value: problem`, with a suggestion for typos.

    known_keys maps a dotted section ('' for the top level) to the keys valid there.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for err in error.errors():
        field = _dotted(err["loc"])
        if field in seen:  # a union reports once per member; one line per field is enough
            continue
        seen.add(field)
        if err["type"] == "extra_forbidden":
            section, _, key = field.rpartition(".")
            hint = closest(key, known_keys.get(section, []))
            lines.append(f"unknown key {field!r}{hint}")
        elif err["type"] == "missing":
            lines.append(f"{field} is required but missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            if err["loc"] and isinstance(err.get("input"), dict):  # a section's own rule: its message names fields
                lines.append(f"{field}: {message}")
            elif err["loc"]:
                lines.append(f"{field} = {err.get('input')!r}: {message}")
            else:  # a cross-field rule: its message already names the fields
                lines.append(message)
    body = "\n  ".join(lines)
    return f"recipe {source} is invalid:\n  {body}"
