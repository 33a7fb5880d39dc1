"""How every launcher starts and fails: bad input is one line on stderr and exit code 2.

`run(main)` replaces ``absl.app.run(main)``. Flags are parsed as absl does, but a bad
flag, a config file or variant that does not load, an override of a config field that
does not exist, or a `ConfigError` raised by the run is printed as one line, with no
traceback and no help text, and the process exits with code 2 before anything is
written. A run that diverges (`DivergenceError`) or cannot write (a full disk, a
read-only workdir) ends with one line and exit code 1. ``--help`` exits with code 0.

A ``--config=configs/x.py[:arg]`` that is not a file under the current directory is
looked up in the installed `configs` package, so that the installed commands
(``l2t-train``, ...) take the same config paths from any directory.
"""

from __future__ import annotations

import difflib
import errno
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import ml_collections
from absl import app, flags

from l2t_jax.errors import ConfigError, DivergenceError

BAD_INPUT = 2
FAILED = 1
# Write failures that are the machine's or the user's, not a bug: one line, no traceback.
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)


def fail(message: str, code: int = BAD_INPUT) -> NoReturn:
    """Prints `message` as one line on stderr and exits with `code`."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """Loads ``path[:arg]`` as `ml_collections.config_flags` does (``get_config(arg)``).

    Raises:
        ConfigError: the file is missing or its ``get_config`` fails, in one line.
    """
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: no config file {path!r} (see configs/)")
    module_spec = importlib.util.spec_from_file_location("_l2t_config_check", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # noqa: BLE001  (whatever the file raises is the user's input)
        raise ConfigError(f"--config={spec}: {e}") from None


def resolve_config_path(spec: str) -> str:
    """``path[:arg]``, with `path` in the installed `configs` package when that is where it is.

    A path that is a file (relative to the current directory) or that names no file of
    the `configs` package is returned as it is, so a missing file is reported as given.
    """
    path, sep, arg = spec.partition(":")
    parts = os.path.normpath(path).split(os.sep)
    if os.path.isfile(path) or len(parts) != 2 or parts[0] != "configs":
        return spec
    package = importlib.util.find_spec("configs")
    for directory in (package.submodule_search_locations or []) if package else []:
        installed = os.path.join(directory, parts[1])
        if os.path.isfile(installed):
            return installed + sep + arg
    return spec


def resolve_config_args(argv: Sequence[str], name: str = "config") -> list[str]:
    """`argv` with the value of every ``--name=...`` / ``--name ...`` resolved by
    `resolve_config_path` (the ``--name.a.b`` overrides are left as they are)."""
    resolved = list(argv)
    for i, arg in enumerate(resolved):
        flag, sep, value = arg.partition("=")
        if not flag.startswith("-") or flag.lstrip("-") != name:
            continue
        if sep:
            resolved[i] = f"{flag}={resolve_config_path(value)}"
        elif i + 1 < len(resolved):
            resolved[i + 1] = resolve_config_path(resolved[i + 1])
    return resolved


def _flag_values(args: Sequence[str], name: str) -> list[tuple[str, str]]:
    """``(flag, value)`` of every ``--name...=value`` or ``--name... value`` in `args`."""
    found = []
    for i, arg in enumerate(args):
        flag, sep, value = arg.partition("=")
        if flag.lstrip("-") != name and not flag.lstrip("-").startswith(name + "."):
            continue
        if not flag.startswith("-"):
            continue
        if not sep:
            value = args[i + 1] if i + 1 < len(args) else ""
        found.append((flag.lstrip("-"), value))
    return found


def check_config_overrides(args: Sequence[str], name: str = "config") -> None:
    """Checks that the config file loads and every ``--config.a.b`` names a field.

    Raises:
        ConfigError: the first bad one, in one line (with the closest field names).
    """
    given = _flag_values(args, name)
    files = [value for flag, value in given if flag == name]
    overrides = [flag for flag, _ in given if flag != name]
    if not files:
        return  # absl reports the missing required flag
    config = load_config_file(files[-1])
    for override in overrides:
        node, path = config, override.split(".")[1:]
        for depth, key in enumerate(path):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                where = ".".join(["config", *path[:depth]])
                known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(key, known, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else (
                    f"; it has {', '.join(known)}" if known else "")
                raise ConfigError(f"--{override}: {where} has no field {key!r}{hint}")
            node = node[key]


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with every error as one line and exit code 2.

    Config file paths are resolved first (`resolve_config_args`); absl's help flags
    (``--help``, ``--helpfull``, ...) print what they print and exit with code 0, not 1.
    """
    argv = resolve_config_args(argv)
    try:
        check_config_overrides(argv[1:])
        return flags.FLAGS(argv)
    except (ConfigError, flags.Error) as e:
        fail(str(e))
    except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        fail(f"bad flag value: {e}")  # what ml_collections raises while applying overrides
    except SystemExit as e:
        # Only the help flags exit while absl parses; the help asked for was given.
        sys.exit(0 if e.code == 1 else e.code)


def guarded(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """`main` with bad input, divergence and write failures reported in one line."""

    def guarded_main(argv: list[str]) -> None:
        if len(argv) > 1:
            fail(f"unexpected arguments {argv[1:]}")
        try:
            main(argv)
        except ConfigError as e:
            fail(str(e))
        except DivergenceError as e:
            fail(str(e), FAILED)
        except OSError as e:
            if _root_errno(e) not in _WRITE_ERRORS:
                raise
            where = f"{e.filename}: " if e.filename else ""
            fail(f"cannot write: {where}{e.strerror or e}", FAILED)

    return guarded_main


def _root_errno(error: BaseException) -> int | None:
    """The errno of `error` or of the first exception it was raised from."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        error = error.__cause__ or error.__context__
    return None


def _help_as_main_program(module_name: str) -> None:
    """Makes ``--help`` show `module_name`'s docstring and flags when an installed command
    (``l2t-train``: a wrapper script that imports the launcher) runs it, as it does under
    ``python -m``: absl describes the flags and docstring of ``sys.argv[0]``'s module."""
    if module_name == "__main__":
        return
    program = sys.modules["__main__"]
    if not program.__doc__:
        program.__doc__ = sys.modules[module_name].__doc__
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], None]) -> None:
    """Runs a launcher's `main` like ``absl.app.run``, with one-line errors."""
    _help_as_main_program(main.__module__)
    app.run(guarded(main), flags_parser=parse_flags)
