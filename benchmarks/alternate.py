"""Run several SFTTrainers in one process, one optimizer step each in turn (A B C D A B C D ...).

Every trainer runs its own, unmodified `trainer.train()` in a thread; a baton lets exactly one thread run at a
time, handed on at each `on_step_begin`. The window from `on_step_begin` to `on_step_end` (forward, backward,
optimizer step, every callback's step work) is timed with all other threads parked, and the peak memory of
that window is recorded. Data loading and logging run outside the window, still holding the baton.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

M_MMAP_THRESHOLD = -3


def return_freed_memory_to_os() -> None:
    """Make glibc serve blocks >= 64 KiB by mmap, so freed tensors leave the RSS and RSS peaks mean something."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except OSError:
        pass


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class MemoryProbe:
    """Peak memory of a window: CUDA allocated bytes on a GPU, else the process RSS high-water mark (Linux).

    On CPU the high-water mark is reset at the window's start through /proc/self/clear_refs.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.start_bytes = 0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_bytes = torch.cuda.memory_allocated()
            return
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.start_bytes = _proc_status("VmRSS")

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.cuda else _proc_status("VmHWM")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class StepRecord:
    seconds: float
    peak_bytes: int
    start_bytes: int
    extra: dict[str, float] = field(default_factory=dict)


class Baton:
    """Round-robin turns between named runners; a finished runner leaves the rotation."""

    def __init__(self, names: list[str]) -> None:
        self.active = list(names)
        self.current = names[0]
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def pass_on(self, name: str, leave: bool = False) -> None:
        with self.cond:
            i = self.active.index(name)
            if leave:
                self.active.remove(name)
            if self.active:
                self.current = self.active[(i if leave else i + 1) % len(self.active)]
            self.cond.notify_all()


class TurnCallback(TrainerCallback):
    """Waits for its turn at each step, times the step and records its peak memory. Add it LAST."""

    def __init__(self, name: str, device: torch.device, on_turn: Callable[[bool], None]) -> None:
        self.name, self.device = name, device
        self.baton: Baton | None = None  # set by run_alternating
        self.on_turn = on_turn  # on_turn(True) when the turn starts, on_turn(False) before it is handed on
        self.probe = MemoryProbe(device)
        self.records: list[StepRecord] = []
        self.step_extras: Callable[[], dict[str, float]] = dict
        self._t0 = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_turn(False)
        self.baton.pass_on(self.name)
        self.baton.wait(self.name)
        self.on_turn(True)
        synchronize(self.device)
        self.probe.start()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        synchronize(self.device)
        seconds = time.perf_counter() - self._t0
        self.records.append(StepRecord(seconds, self.probe.peak(), self.probe.start_bytes, self.step_extras()))


def run_alternating(trainers: dict[str, Trainer], turns: dict[str, TurnCallback]) -> dict[str, str]:
    """Train every trainer, one step each in turn, in the order given; returns the errors of runs that failed."""
    baton = Baton(list(trainers))
    for turn in turns.values():
        turn.baton = baton
    errors: dict[str, str] = {}

    def run(name: str) -> None:
        baton.wait(name)
        turns[name].on_turn(True)
        try:
            trainers[name].train()
        except Exception as err:  # e.g. out of memory: the run leaves the rotation, the others go on
            errors[name] = f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"
        finally:
            if name in errors:  # free what the failed step held, now that its traceback is gone
                trainers[name].model.zero_grad(set_to_none=True)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            turns[name].on_turn(False)
            baton.pass_on(name, leave=True)

    threads = [threading.Thread(target=run, args=(name,), name=f"bench-{name}") for name in trainers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
