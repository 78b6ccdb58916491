"""The command line's parser class: defaults shown in `--help`, deprecated flag spellings that keep
working with a warning, and checks that need several flags at once (run as part of parsing, so a
bad combination is argparse's own one-line error, rc 2, before anything is imported or written).
"""
from __future__ import annotations

import argparse
from typing import Callable


class HelpFormatter(argparse.HelpFormatter):
    """argparse's ArgumentDefaultsHelpFormatter, minus the noise: no "(default: None)" or
    "(default: False)", and nothing added to a help text that already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text or "%(default)" in text:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


class QuasarParser(argparse.ArgumentParser):
    """ArgumentParser with HelpFormatter and post-parse checks (`after_parse`); subparsers are of
    this class too (add_subparsers uses the parent's class)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._after_parse: list[Callable[[argparse.Namespace], None]] = []

    def after_parse(self, check: Callable[[argparse.Namespace], None]) -> None:
        """check(namespace) once this parser has parsed; a ValueError it raises is a usage error."""
        self._after_parse.append(check)

    def parse_known_args(self, args=None, namespace=None):
        namespace, rest = super().parse_known_args(args, namespace)
        for check in self._after_parse:
            try:
                check(namespace)
            except ValueError as e:
                self.error(str(e))
        return namespace, rest


def after_parse(parser: argparse.ArgumentParser, check: Callable[[argparse.Namespace], None]) -> None:
    """Register `check` on a QuasarParser; on a plain parser (a caller's own) run nothing."""
    if isinstance(parser, QuasarParser):
        parser.after_parse(check)


class Deprecated(argparse.Action):
    """An old spelling of a flag: it sets the same dest as the new one (appending when `append`) and
    records a warning in `namespace.deprecations`, shown once the command starts."""

    def __init__(self, option_strings, dest, use: str, append: bool = False, **kwargs):
        kwargs.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.use, self.append = use, append

    def __call__(self, parser, namespace, values, option_string=None):
        if self.append:
            values = [*(getattr(namespace, self.dest, None) or []), values]
        setattr(namespace, self.dest, values)
        note_deprecated(namespace, f"{option_string} is deprecated; use {self.use}")


def note_deprecated(namespace, message: str) -> None:
    seen = list(getattr(namespace, "deprecations", None) or [])
    if message not in seen:
        seen.append(message)
    namespace.deprecations = seen


def warn_deprecated(args, log) -> None:
    """Each recorded deprecation as a JSON warning event on `log` (stderr carries JSON lines only)."""
    for message in getattr(args, "deprecations", None) or []:
        log.warning("deprecated flag", extra={"fields": {"detail": message}})
