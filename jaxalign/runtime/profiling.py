"""A ``jax.profiler`` trace of a window of training steps (config ``profile``).

The trace covers steps ``skip + 1 .. skip + steps`` of this process (the first ones compile)
and goes to ``WORKDIR/profile``: an XProf trace (``plugins/profile/<time>/*.xplane.pb``, for
TensorBoard's profile plugin or ``xprof``) and a Perfetto trace (``perfetto_trace.json.gz``
beside it, for ui.perfetto.dev). Each traced step's dispatch is a ``train`` step annotation
(``step_num`` = the optimizer step). Only process 0 traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax

PROFILE_DIR = "profile"
T = TypeVar("T")


class StepTrace:
    """Starts the trace before the window's first step and stops it once the device has
    finished the last one (``close`` stops it early when the run ends inside the window)."""

    def __init__(self, directory: str, *, steps: int, skip: int, enabled: bool):
        self.directory = directory
        self.first, self.end = skip, skip + steps  # this process's step indices [first, end)
        self.enabled = enabled and steps > 0
        self.done = 0  # steps this process has dispatched
        self.active = False
        self.traced: list[int] = []  # optimizer steps inside the trace

    def step(self, number: int, dispatch: Callable[..., T], *args) -> T:
        """``dispatch(*args)`` (optimizer step ``number``), annotated when it falls in the window."""
        if self.enabled and self.done == self.first:
            self._start()
        if not self.active:
            self.done += 1
            return dispatch(*args)
        with jax.profiler.StepTraceAnnotation("train", step_num=number):
            outputs = dispatch(*args)
        self.traced.append(number)
        self.done += 1
        if self.done == self.end:
            jax.block_until_ready(outputs)
            self.close()
        return outputs

    def _start(self) -> None:
        """Starts the trace; a profiler that cannot start (one already running, an unwritable
        directory) is a warning, not the end of the run."""
        try:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        except Exception as e:  # noqa: BLE001 - whatever the profiler raises, training goes on
            print(f"warning: profile: the trace did not start ({type(e).__name__}: {e}); training goes on untraced",
                  flush=True)
            return
        self.active = True

    def close(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active = False
        steps = f"steps {self.traced[0]}..{self.traced[-1]}" if self.traced else "no complete step"
        print(f"profile: {steps} traced to {self.directory} "
              "(TensorBoard's profile plugin, or perfetto_trace.json.gz in ui.perfetto.dev)", flush=True)
