"""Rewards of sampled completions: Python functions, a reward model, and their weighted sum.

A reward function is named ``module:function`` (importable from the working directory) or
``path/to/file.py:function`` and called once per round on all of it:

    fn(prompts, completions, *, completion_ids, stopped, prompt_index, **columns) -> sequence of floats

with one entry per completion (prompt-major: the K completions of the first prompt, then the
next prompt's, ...): ``prompts`` the prompt text (or messages), ``completions`` the completion
text (the stop token removed, special tokens skipped), ``completion_ids`` the sampled ids,
``stopped`` whether it ended with a stop token, ``prompt_index`` the prompt's row among the
source's good rows, and the prompt row's other columns by name (e.g. ``answer``). A function
should accept ``**kwargs``. Anything wrong (it raises, returns the wrong number of values, a
value that is not a finite number) is a ``RewardError`` naming the function and the first
prompt concerned.

The reward of a completion is ``sum_i w_i * r_i - missing_eos_penalty * [no stop token]``
(``combine``), with the reward model's score first among the ``r_i`` when there is one.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["ARGUMENTS", "RewardError", "Scorer", "combine", "load_function", "parse_functions"]

# The names a reward function is called with; a prompt row's column may not take one of them.
ARGUMENTS = ("prompts", "completions", "completion_ids", "stopped", "prompt_index")


class RewardError(RuntimeError):
    """A reward could not be computed; the message names the scorer and the prompt."""


@dataclasses.dataclass(frozen=True)
class Scorer:
    """A named reward: ``score(prompts, completions, metadata) -> float array [N]``."""

    name: str
    score: Callable[[list[Any], list[str], dict[str, list[Any]]], np.ndarray]


def parse_functions(spec: str) -> list[str]:
    """The comma-separated function names of ``online.reward_function``."""
    return [s.strip() for s in spec.split(",") if s.strip()]


def load_function(name: str) -> Callable[..., Any]:
    """The function ``module:function`` or ``path/to/file.py:function``; ``RewardError`` saying
    what could not be found."""
    target, sep, attribute = name.rpartition(":")
    if not sep or not target or not attribute:
        raise RewardError(f"reward function {name!r}: expected module:function or path/to/file.py:function")
    try:
        if target.endswith(".py"):
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise RewardError(f"reward function {name!r}: no such file {path}")
            spec = importlib.util.spec_from_file_location(f"jaxalign_reward_{abs(hash(path))}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(target)
    except RewardError:
        raise
    except Exception as e:  # the user's module failed to import
        raise RewardError(f"reward function {name!r}: importing {target} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, attribute, None)
    if not callable(fn):
        raise RewardError(f"reward function {name!r}: {target} has no function {attribute!r}")
    return fn


def _show(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def function_scorer(name: str, fn: Callable[..., Any] | None = None) -> Scorer:
    """A ``Scorer`` of the reward function ``name`` (loaded unless ``fn`` is given), with the
    checks of the module docstring."""
    fn = fn or load_function(name)

    def score(prompts: list[Any], completions: list[str], metadata: dict[str, list[Any]]) -> np.ndarray:
        try:
            values = fn(prompts, completions, **metadata)
        except Exception as e:
            culprit = _first_failing(fn, prompts, completions, metadata)
            where = f" (first failing prompt: {_show(prompts[culprit])})" if culprit is not None else ""
            raise RewardError(f"reward function {name!r} raised {type(e).__name__}: {e}{where}") from e
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {name!r} returned {type(values).__name__}, not a sequence of floats "
                              f"(one per completion)") from None
        if len(values) != len(completions):
            raise RewardError(f"reward function {name!r} returned {len(values)} values for {len(completions)} "
                              "completions (one per completion, prompt-major)")
        out = np.empty(len(values), np.float64)
        for i, v in enumerate(values):
            try:
                out[i] = float(v)
            except (TypeError, ValueError):
                out[i] = math.nan
            if not math.isfinite(out[i]):
                raise RewardError(f"reward function {name!r} returned {v!r} for completion {i} of prompt "
                                  f"{_show(prompts[i])}: every reward must be a finite number")
        return out

    return Scorer(name, score)


def _first_failing(fn: Callable[..., Any], prompts: list[Any], completions: list[str],
                   metadata: dict[str, list[Any]]) -> int | None:
    """The first item on which ``fn`` alone raises (to name the prompt), or None."""
    for i in range(len(prompts)):
        try:
            fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in metadata.items()})
        except Exception:
            return i
    return None


def combine(rewards: Sequence[np.ndarray], weights: Sequence[float], stopped: np.ndarray,
            missing_eos_penalty: float) -> np.ndarray:
    """``sum_i w_i * r_i - missing_eos_penalty * (1 - stopped)`` (float64 ``[N]``)."""
    total = np.zeros(len(stopped), np.float64)
    for reward, weight in zip(rewards, weights, strict=True):
        total += weight * np.asarray(reward, np.float64)
    return total - missing_eos_penalty * (1.0 - np.asarray(stopped, np.float64))
