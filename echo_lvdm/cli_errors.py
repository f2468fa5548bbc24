"""A LightningCLI parse error as one line: the key, what was found and what was expected.

jsonargparse reports a bad flag or config value with the whole usage block and a nested report (every Union subtype it
tried, the NestedArg it was given); LightningCLI exits with status 2 after printing it. :class:`OneLineParser` raises a
:class:`~datamodules.errors.UserInputError` instead, which the console script prints as ``echo-lvdm: <line>`` and exit
status 1, as it prints every other user error. Parsers jsonargparse builds internally (``exit_on_error=False``, to try
one Union subtype after another) keep their behaviour.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from datamodules.errors import UserInputError, read_yaml

_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value type:",
          "Expected a path but")


class OneLineParser(LightningArgumentParser):
    """LightningCLI's parser; a parse error is a :class:`UserInputError` with :func:`one_line`'s message, and a key
    no config may set names the config file that sets it."""

    _args: list[str] = []

    def parse_args(self, args: Sequence[str] | None = None, *positional, **kwargs):
        self._args = list(sys.argv[1:] if args is None else args)
        return super().parse_args(args, *positional, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        from jsonargparse._common import debug_mode_active  # JSONARGPARSE_DEBUG: jsonargparse's own report

        if not self.exit_on_error or debug_mode_active():
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        raise UserInputError(one_line(message, parser.prog.replace(" [options]", ""), self._args)) from None


def config_paths(args: Sequence[str]) -> list[str]:
    """The ``--config`` / ``-c`` files among command-line ``args``, in order."""
    args = list(args)
    return [value for flag, value in zip(args, args[1:]) if flag in ("--config", "-c")] + \
        [arg.split("=", 1)[1] for arg in args if arg.startswith("--config=")]


def configs_setting(key: str, args: Sequence[str]) -> list[str]:
    """The ``--config`` files among ``args`` whose YAML sets the dotted ``key``."""
    found = []
    for path in config_paths(args):
        try:
            node = read_yaml(path)
        except (OSError, UserInputError):
            continue
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING:
            found.append(path)
    return found


_MISSING = object()


def one_line(message: str, prog: str, args: Sequence[str] = ()) -> str:
    """The telling line of a jsonargparse error report, as ``<command>: --<key>: <problem>`` (``prog``, the parser's,
    ends with the command: fit, validate, ...). A key no config may set names the ``--config`` files among ``args``
    that set it."""
    command = prog.split()[-1] if prog.split() else "echo-lvdm"
    prog = f"echo-lvdm {command}"
    keys, class_path, details, expected, given, innermost = [], None, [], [], None, False
    for line in message.splitlines():
        body = line.strip().removeprefix("- ").strip()
        if match := re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', body):
            keys.append(match[1])
            body = match[2]
        if not body or body.startswith(_NOISE):
            continue
        if match := re.fullmatch(r"Problem with given class_path '([^']+)':", body):
            class_path = match[1]
        elif match := re.fullmatch(r"Expected a <class '([^']+)'>\.?(?: Got value: (.*))?", body):
            name = "None" if match[1] == "NoneType" else match[1].rsplit(".", 1)[-1]
            if match[2]:  # the innermost key's report: the outer Union's alternatives are not about it
                expected, given, innermost = [name], match[2], True
            elif not innermost:
                expected.append(name)
        elif match := re.fullmatch(r"Given value: (.*)", body):
            if not match[1].startswith(("NestedArg(", "{")):
                given = given or match[1]
        else:
            details.append(body)
    key = ".".join(keys)
    if details:
        detail = details[0]
        if (option := re.fullmatch(r"Option '([^']+)' is not accepted", detail)) and class_path:
            group = keys[0] if keys else "model"
            files = configs_setting(f"{group}.init_args.{option[1]}", args) or \
                configs_setting(f"{group}.{option[1]}", args)
            key = f"{key}.{option[1]}" if key else option[1]
            where = f" (set in {', '.join(files)})" if files else ""
            detail = f"{class_path} has no argument {option[1]!r}{where}; {prog} --{group}.help {class_path} lists them"
        elif class_path:
            detail = f"class_path {class_path!r}: {detail}"
        elif option := re.fullmatch(r"Subcommand '[^']+' does not accept option '([^']+)'", detail):
            files = configs_setting(option[1], args)
            detail = (f"{' and '.join(files) if files else 'a config'} sets {option[1]!r}, which {command} does not "
                      f"accept ({prog} --help lists the options)")
        elif detail.startswith("unrecognized arguments"):
            detail = f"{detail} ({prog} --help lists the options)"
    elif expected:
        detail = f"expected {' or '.join(dict.fromkeys(expected))}" + (f", got {given!r}" if given else "")
    else:
        detail = "the arguments do not parse"
    return f"{command}: --{key}: {detail}" if key else f"{command}: {detail}"
