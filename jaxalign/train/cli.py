"""Command line: ``python -m jaxalign.train --config configs/X.py [--workdir DIR] [--config.KEY=VALUE ...]``.

The config file defines ``get_config()`` (ml_collections; ``configs/X.py:ARG`` passes ``ARG``);
``--config.a.b=value`` overrides a field (absl ``config_flags`` parsing, types are checked).
A key that does not exist is an error naming the closest existing keys. Without
``--workdir`` the run goes to ``runs/<recipe>-<YYYYmmdd-HHMMSS>``. Running the same command
again on a directory that holds checkpoints resumes the run.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxalign.train.config import ConfigError, close_matches, flatten, validate

__all__ = ["main", "parse_command_line"]

USAGE = "usage: python -m jaxalign.train --config configs/RECIPE.py [--workdir DIR] [--config.KEY=VALUE ...]"

# Exit codes (docs/fault_tolerance.md). 1 is left to Python for an unexpected exception.
EXIT_OK = 0  # all steps done (or the run was already finished)
EXIT_USAGE = 2  # bad command line or config, or the run cannot start/resume (message on stderr)
EXIT_NONFINITE = 3  # stopped after max_consecutive_nonfinite non-finite steps; checkpoint = last good state
EXIT_INTERRUPTED = 75  # SIGTERM/SIGINT: checkpoint saved, rerun the same command to resume (EX_TEMPFAIL)
STATUS_EXIT_CODES = {"finished": EXIT_OK, "stopped": EXIT_OK, "nonfinite": EXIT_NONFINITE, "interrupted": EXIT_INTERRUPTED}


def _flag_values(argv: Sequence[str]) -> flags.FlagValues:
    """Parses ``argv`` with a private absl FlagValues (nothing global is touched)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "recipe file defining get_config()", flag_values=fv, lock_config=True, sys_argv=list(argv)
    )
    flags.DEFINE_string("workdir", None, "run directory (default: a new directory under runs/)", flag_values=fv)
    try:
        fv(list(argv))
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    return fv


def _override_names(argv: Sequence[str]) -> list[str]:
    """The ``KEY`` of every ``--config.KEY[=VALUE]`` argument."""
    names = []
    for arg in argv[1:]:
        if arg.startswith("--config."):
            names.append(arg[len("--config."):].split("=", 1)[0])
    return names


def parse_command_line(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str | None, str]:
    """``(config, workdir or None, recipe path)`` from ``argv`` (``argv[0]`` is the program).

    Raises ``ConfigError`` for a missing ``--config``, an unknown override key (with close
    matches), a badly typed value, or an invalid resulting config.
    """
    argv = list(argv)
    overrides = _override_names(argv)
    base_argv = [a for i, a in enumerate(argv) if i == 0 or not a.startswith("--config.")]
    base = _flag_values(base_argv)
    if base["config"].value is None:
        raise ConfigError(f"--config is required\n{USAGE}")
    recipe = base["config"].config_filename
    if not os.path.isfile(recipe):
        raise ConfigError(f"--config {recipe}: no such file\n{USAGE}")
    try:
        known = list(flatten(base.config))
    except Exception as e:  # an error inside the recipe file: report it with the file name
        raise ConfigError(f"--config {recipe}: could not load get_config(): {type(e).__name__}: {e}") from None
    unknown = [name for name in overrides if name not in known]
    if unknown:
        lines = []
        for name in unknown:
            matches = close_matches(name, known)
            hint = f"; did you mean {', '.join('--config.' + m for m in matches)}?" if matches else ""
            lines.append(f"unknown config key --config.{name}{hint}")
        raise ConfigError("\n".join(lines))
    fv = _flag_values(argv)
    config = fv.config
    validate(config)
    return config, fv.workdir, recipe


def default_workdir(recipe: str, root: str = "runs") -> str:
    """``runs/<recipe name>-<timestamp>`` (a new directory per run)."""
    name = os.path.splitext(os.path.basename(recipe.split(":", 1)[0]))[0] or "run"
    return os.path.join(root, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv: Sequence[str] | None = None, *, reexec: bool = False) -> int:
    """Parses the command line, trains, prints where the outputs went; returns the exit code
    (``EXIT_OK``, ``EXIT_USAGE``, ``EXIT_NONFINITE``, ``EXIT_INTERRUPTED``).

    ``reexec`` (the program's entry point only): with ``config.huge_pages`` the process first
    restarts itself with transparent huge pages for malloc (``jaxalign.train.huge_pages``).
    """
    argv = list(sys.argv if argv is None else argv)
    try:
        config, workdir, recipe = parse_command_line(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if reexec and config.huge_pages:
        from jaxalign.train.huge_pages import reexec_with_huge_pages

        reexec_with_huge_pages()
    from jaxalign.train.loop import RunError, train

    workdir = workdir or default_workdir(recipe)
    try:
        result = train(config, workdir)
    except (ConfigError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if result.is_main_process:
        print(result.summary(), flush=True)
    if result.message and result.is_main_process:
        print(f"jaxalign.train: {result.message}", file=sys.stderr, flush=True)
    return STATUS_EXIT_CODES[result.status]
