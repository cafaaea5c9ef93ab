"""Command-line flag names shared by every stage, and the old spellings they still accept.

One flag name per kind of path: a prepared data set is ``--data``, a feature cache ``--cache``, a
run directory ``--run-dir``; what a command writes is ``--output``. A renamed flag (or config key)
keeps working for one release under its old name, which prints one deprecation line on stderr.
``add_flag`` declares a flag with its old names; ``take_positional`` turns an old positional
argument into its flag; ``warn_deprecated`` is the one line, also used for renamed config keys.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from eaglecache.errors import UserError


def warn_deprecated(old: str, new: str) -> None:
    """The one line an old spelling prints: on stderr, so output that a script parses is unchanged."""
    print(f"warning: {old} is deprecated, use {new} (the old name goes away in a later release)", file=sys.stderr)


class _DeprecatedAlias(argparse.Action):
    """Stores like the flag it stands for, after saying so."""

    def __init__(self, option_strings, dest, replacement: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.replacement = replacement

    def __call__(self, parser, namespace, values, option_string=None):
        warn_deprecated(option_string, self.replacement)
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_flag", option_string)


def add_flag(parser, flag: str, *, aliases: tuple[str, ...] = (), required: bool = False, **kwargs: Any):
    """Add ``flag`` (``--data``), also accepting each of ``aliases`` (``--input``) with a deprecation line.

    The flag and its aliases exclude one another; ``required`` asks for one of them. The aliases
    are left out of ``--help``. ``args.<dest>_flag`` is the spelling given, for messages that name it.
    """
    if not aliases:
        return parser.add_argument(flag, required=required, **kwargs)
    kwargs.setdefault("dest", flag.lstrip("-").replace("-", "_"))
    parser.set_defaults(**{f"{kwargs['dest']}_flag": flag})
    group = parser.add_mutually_exclusive_group(required=required)
    action = group.add_argument(flag, **kwargs)
    alias_kwargs = {k: v for k, v in kwargs.items() if k not in ("help", "action")}
    for alias in aliases:
        group.add_argument(alias, action=_DeprecatedAlias, replacement=flag, help=argparse.SUPPRESS, **alias_kwargs)
    return action


def add_positional_alias(parser, dest: str) -> None:
    """Accept an old positional argument in place of the flag whose ``dest`` it is: the overrides
    (``KEY=VALUE``, nargs *) take it and the command line hands it back (eaglecache/cli.py), so it
    is not declared here; ``take_positional`` reads it."""
    aliases = parser.get_default("positional_aliases") or ()
    parser.set_defaults(positional_aliases=(*aliases, dest), **{f"{dest}_positional": None})


def take_positional(args: argparse.Namespace, dest: str, flag: str) -> Any:
    """The value of ``flag``, or of the old positional argument in its place (with a deprecation line)."""
    value, positional = getattr(args, dest, None), getattr(args, f"{dest}_positional", None)
    if positional is not None:
        if value is not None:
            raise UserError(f"give {flag} once (a positional {positional!r} and {flag} {value!r} were both given)")
        warn_deprecated(f"a positional {dest} argument", flag)
        value = positional
    if value is None:
        raise UserError(f"the following argument is required: {flag}")
    return value
