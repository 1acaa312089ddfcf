"""Command line: ``python -m jaxalign.train --config configs/X.py [--workdir DIR] [--config.KEY=VALUE ...]``.

The config file defines ``get_config()`` (ml_collections; ``configs/X.py:ARG`` passes ``ARG``);
``--config.a.b=value`` overrides a field (absl ``config_flags`` parsing, types are checked).
A key that does not exist is an error naming the closest existing keys; ``--config FILE``
may stand anywhere among them. Without ``--workdir`` the run goes to ``runs/<recipe>``, so
running the same command again resumes it. ``--help`` (``-h``) prints ``help_text()``;
``--print-config`` prints the resolved config, every key with its comment; both exit 0.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from jaxalign.train.config import ConfigError, close_matches, describe, flatten, validate

__all__ = ["main", "parse_command_line"]

USAGE = "usage: python -m jaxalign.train --config configs/RECIPE.py [--workdir DIR] [--config.KEY=VALUE ...]"
PRINT_CONFIG = "--print-config"
RECIPES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")

HELP = f"""{USAGE}

Trains the recipe's model with its objective (SFT, DPO and the other pairwise preference
losses, or a Bradley-Terry reward model; jaxalign/objectives). With online.rounds > 0
(configs/online_*.py) it runs the online loop instead: rounds of sampling from the policy,
scoring, pairing and training (docs/online.md).

  --config FILE[:ARG]     recipe file defining get_config() (ARG is passed to it); required
  --config.KEY=VALUE      override one config field, e.g. --config.steps=100 or
                          --config.optimizer.learning_rate=1e-5 (types and ranges are checked;
                          an unknown KEY is an error naming the closest keys)
  --workdir DIR           run directory (default runs/<recipe>); running the same command
                          again on a directory with checkpoints resumes the run
  {PRINT_CONFIG}          print the resolved config, every key with its value and comment
                          (docs/configuration.md has the checks), and exit
  -h, --help              show this message
{{recipes}}
Malloc's huge pages (config.huge_pages, default True): on a CPU host running Linux with
glibc >= 2.35 and transparent huge pages (THP mode madvise or always), the trainer restarts
itself once, before JAX loads, with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, so that the
buffers XLA:CPU allocates in every step come in 2 MiB pages (fewer page faults; 1.09-1.26x
faster steps where measured, docs/performance.md). A CPU host: JAX_PLATFORMS names only cpu,
or, with it unset, no GPU/TPU device file is present (/dev/nvidia*, /dev/kfd, /dev/accel*,
/dev/vfio/<N>, ...). Turn it off with --config.huge_pages=False (or by setting
glibc.malloc.hugetlb yourself in GLIBC_TUNABLES, e.g. =0).

Exit codes: 0 done (or already finished), 1 failed on the way (e.g. an online run's reward
function raised; what was computed is kept), 2 bad command line/config or the run cannot
start, 3 stopped after too many non-finite steps, 75 interrupted (checkpoint saved; run the
same command again to resume).
"""
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull")


def help_text() -> str:
    """``HELP`` with the recipes of this checkout's ``configs/`` listed."""
    names = sorted(f[:-3] for f in os.listdir(RECIPES_DIR) if f.endswith(".py")) if os.path.isdir(RECIPES_DIR) else []
    recipes = f"\nRecipes ({RECIPES_DIR}): {', '.join(names)}\n" if names else ""
    return HELP.format(recipes=recipes)

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


def _config_first(argv: list[str]) -> list[str]:
    """``argv`` with ``--config FILE`` (or ``--config=FILE``) moved before the overrides, which
    absl needs: ``--config.KEY=VALUE`` may then be given in any order."""
    for i, arg in enumerate(argv[1:], 1):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return [argv[0], *argv[i : i + 2], *argv[1:i], *argv[i + 2 :]]
        if arg.startswith(("--config=", "-config=")):
            return [argv[0], arg, *argv[1:i], *argv[i + 1 :]]
    return argv


def parse_command_line(argv: Sequence[str], *, check: bool = True) -> tuple[ml_collections.ConfigDict, str | None, str]:
    """``(config, workdir or None, recipe path)`` from ``argv`` (``argv[0]`` is the program).

    Raises ``ConfigError`` for a missing ``--config``, an unknown override key (with close
    matches), a badly typed value, or (``check``) an invalid resulting config.
    """
    argv = _config_first(list(argv))
    overrides = _override_names(argv)
    base_argv = [a for i, a in enumerate(argv) if i == 0 or not a.startswith("--config.")]
    base = _flag_values(base_argv)
    if base["config"].value is None:
        raise ConfigError(f"--config is required\n{USAGE}\n(--help for more)")
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
    if check:
        validate(fv.config)
    return fv.config, fv.workdir, recipe


# The drivers, by name: the offline trainer, the online driver (``online.rounds > 0``) and the
# distillation pipelines (``distill.pipeline``). The latter two sit above the trainer
# (docs/architecture.md, "Layering"); the command line names them, as an entry point does, and
# imports one only when a config asks for it.
DRIVERS = {"offline": "jaxalign.train.loop", "online": "jaxalign.online.driver",
           "distill": "jaxalign.distill.pipeline"}


def driver(config: ml_collections.ConfigDict) -> Any:
    """The module whose ``train(config, workdir) -> RunResult`` runs ``config``."""
    if config.distill.pipeline != "none":
        return importlib.import_module(DRIVERS["distill"])
    return importlib.import_module(DRIVERS["online" if config.online.rounds else "offline"])


def default_workdir(recipe: str, root: str = "runs") -> str:
    """``runs/<recipe name>``: the same command resumes the same run."""
    name = os.path.splitext(os.path.basename(recipe.split(":", 1)[0]))[0] or "run"
    return os.path.join(root, name)


def main(argv: Sequence[str] | None = None, *, reexec: bool = False) -> int:
    """Parses the command line, trains, prints where the outputs went; returns the exit code
    (``EXIT_OK``, ``EXIT_USAGE``, ``EXIT_NONFINITE``, ``EXIT_INTERRUPTED``).

    ``reexec`` (the program's entry point only): with ``config.huge_pages`` the process first
    restarts itself with transparent huge pages for malloc, on CPU hosts where glibc and the
    kernel support them (``jaxalign.runtime.huge_pages``; see ``help_text()``).
    """
    argv = list(sys.argv if argv is None else argv)
    if any(arg in HELP_FLAGS for arg in argv[1:]):
        print(help_text(), end="", flush=True)
        return EXIT_OK
    print_config = PRINT_CONFIG in argv[1:]
    try:
        config, workdir, recipe = parse_command_line([a for a in argv if a != PRINT_CONFIG], check=not print_config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if print_config:
        print(describe(config), flush=True)
        return EXIT_OK
    if reexec and config.huge_pages:
        from jaxalign.runtime.huge_pages import reexec_with_huge_pages

        reexec_with_huge_pages()
    from jaxalign.train.build import RunError

    workdir = workdir or default_workdir(recipe)
    try:
        result = driver(config).train(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if result.is_main_process:
        print(result.summary(), flush=True)
    if result.message and result.is_main_process:
        print(f"jaxalign.train: {result.message}", file=sys.stderr, flush=True)
    return STATUS_EXIT_CODES[result.status]
