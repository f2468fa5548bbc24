"""``UserInputError``: what the user gave is wrong — a file, a row, a flag, a checkpoint — not the code.

Every ``echo-lvdm`` command prints such an error as one line (``echo-lvdm: <message>``) and exits with status 1, without
a traceback (``ECHO_LVDM_DEBUG=1`` shows it). Raise it, or a subclass, with a message that names the file, row or key,
what was found and what was expected. It lives at the bottom of the import order so that every layer can raise it.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """Bad input from the user; the message says where, what was found and what was expected."""


def read_yaml(path) -> object:
    """A YAML file's content; malformed YAML is a :class:`UserInputError` naming the file, line and column."""
    import yaml
    from pathlib import Path

    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise UserInputError(f"{path}{where}: not valid YAML ({problem})") from err
