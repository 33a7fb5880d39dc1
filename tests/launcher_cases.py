"""Runs one launcher over many command lines in one process (imports and JAX start once).

  python tests/launcher_cases.py launch.train CASES.json RESULTS.json

CASES.json is a list of ``{"args": [...], "watch": [paths]}``. Each command line goes
through the launcher's real flag parsing and `main`, as `launch.cli.run` runs them; its
exit code, everything written to file descriptor 2 and, for every watched path, a digest
of every file under it (or None when the path does not exist) before and after are
written to RESULTS.json.
"""

import hashlib
import importlib
import json
import os
import sys
import tempfile
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags, logging  # noqa: E402  (after the path above)

from launch import cli  # noqa: E402


def digest(path: str) -> dict | None:
    """``{relative path: sha256}`` of every file under `path`; None if it is missing."""
    if not os.path.lexists(path):
        return None
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return {".": hashlib.sha256(f.read()).hexdigest()}
    found = {}
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            with open(full, "rb") as f:
                found[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
    return found


def run_case(program: str, main, args: list[str]) -> tuple[object, str]:
    """One command line: ``(exit code, stderr)``; a Python exception is code "traceback"."""
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # ml_collections defines --config.* anew per parse
        if name.startswith("config."):
            delattr(flags.FLAGS, name)
    sys.argv = [program, *args]  # ml_collections reads config overrides from sys.argv
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            code = 0
            try:
                cli.guarded(main)(cli.parse_flags(sys.argv))
            except SystemExit as e:
                code = e.code
            except BaseException:  # noqa: BLE001  (what the test must see)
                traceback.print_exc()
                code = "traceback"
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return code, captured.read().decode(errors="replace")


def main() -> None:
    program, cases_path, results_path = sys.argv[1:]
    launcher = importlib.import_module(program)
    # As `absl.app.run` sets logging up: INFO lines to stderr.
    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    with open(cases_path) as f:
        cases = json.load(f)
    results = []
    for case in cases:
        before = {p: digest(p) for p in case["watch"]}
        code, stderr = run_case(program, launcher.main, case["args"])
        after = {p: digest(p) for p in case["watch"]}
        results.append({"code": code, "stderr": stderr,
                        "changed": [p for p in case["watch"] if before[p] != after[p]]})
    with open(results_path, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
