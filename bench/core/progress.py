"""How long work shows its progress on stderr, decided from `runtime.progress` (`--quiet` sets it to quiet):
a live tqdm bar on a terminal, plain lines (no carriage returns) in log files and CI consoles, or nothing but
warnings and errors.

Two kinds of work report through it: items that each take a while, counted before they start (evaluation
records: `ItemProgress`), and a loop of optimiser steps (pretraining: `StepProgress`)."""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import TextIO

BAR, LINES, QUIET = "bar", "lines", "quiet"
# the values of runtime.progress; true and false, its values before it had modes, mean auto and quiet
SETTINGS = ("auto", BAR, LINES, QUIET)
PREFIX = "bench: "


def display_mode(setting: str | bool, stream: TextIO | None = None, environ: Mapping[str, str] | None = None,
                 main: bool = True) -> str:
    """BAR, LINES or QUIET for `runtime.progress` = `setting`. `auto` (or true) is a bar when `stream`
    (default: stderr) is a terminal and the environment variable CI is unset, else lines: a log file or a CI
    console would keep every redraw of a bar. A process other than a torchrun job's main one (`main`) is QUIET,
    so one job prints each line once."""
    if not main or setting is False or setting == QUIET:
        return QUIET
    if setting in (BAR, LINES):
        return setting
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    on_terminal = bool(getattr(stream, "isatty", lambda: False)())
    under_ci = environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    return BAR if on_terminal and not under_ci else LINES


# the mode of this process's own notes (`note`): set once from runtime.progress where a command starts
# (bench.experiment.setup.start); lines until then, so that library use is not silent
_process_mode = LINES


def set_process_mode(mode: str) -> None:
    """The mode `note` prints in: what `display_mode` decided for this process's runtime.progress."""
    global _process_mode
    _process_mode = mode


def note(message: str) -> None:
    """`bench: message` on stderr unless this process is quiet: for the long steps of layers that are given no
    runtime settings (generating the synthetic benchmark, decoding images into the cache)."""
    say(_process_mode, message)


def about(seconds: float) -> str:
    """A duration as a person reads it at a glance: ~40 s, ~12 min, ~3.5 h."""
    if seconds < 90:
        return f"~{max(1, round(seconds))} s"
    if seconds < 90 * 60:
        return f"~{round(seconds / 60)} min"
    return f"~{seconds / 3600:.1f} h"


def say(mode: str, message: str, stream: TextIO | None = None) -> None:
    """`bench: message` on `stream` (default: stderr) unless QUIET; in BAR mode through tqdm, which prints it
    above a bar being drawn instead of through it."""
    if mode == QUIET:
        return
    stream = sys.stderr if stream is None else stream
    if mode == BAR:
        from tqdm import tqdm

        tqdm.write(PREFIX + message, file=stream)
    else:
        print(PREFIX + message, file=stream, flush=True)


class ItemProgress:
    """Progress through `total` items run one after another (evaluation records), each between `begin` and
    `finish`. BAR: a bar naming the item running, with done/total and an ETA from the mean time of the finished
    items. BAR and LINES: one line per finished item, with its outcome, its time, how many are left and the ETA.
    QUIET: nothing. `close` it whatever happens, so that an error prints below the bar, not through it."""

    def __init__(self, mode: str, total: int, unit: str = "record", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.mode, self.total, self.stream, self.clock = mode, total, stream, clock
        self.finished, self.spent = 0, 0.0
        self.label, self.started = "", 0.0
        self.bar = None
        if mode == BAR and total:
            from tqdm import tqdm

            # smoothing=0: tqdm's ETA from the mean time per item, not from the last one (fine-tuning and
            # zero-shot records differ a hundredfold)
            self.bar = tqdm(total=total, unit=unit, dynamic_ncols=True, smoothing=0, leave=False,
                            file=sys.stderr if stream is None else stream)

    def begin(self, label: str) -> None:
        """The item `label` starts."""
        self.label, self.started = label, self.clock()
        if self.bar is not None:
            self.bar.set_description_str(label)

    def finish(self, outcome: str = "") -> None:
        """The item begun last is done; `outcome` (e.g. its headline metric) goes into its line."""
        seconds = self.clock() - self.started
        self.finished += 1
        self.spent += seconds
        left = self.total - self.finished
        rest = f"{left} left, ETA {about(self.spent / self.finished * left)}" if left > 0 else "none left"
        shown = f": {outcome}" if outcome else ""
        say(self.mode, f"[{self.finished}/{self.total}] {self.label}{shown} ({seconds:.1f} s; {rest})", self.stream)
        if self.bar is not None:
            self.bar.update(1)

    def done_elsewhere(self) -> None:
        """An item counted as to do was done by another process meanwhile: one fewer to run here."""
        self.total -= 1
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StepProgress:
    """Progress through optimiser steps `start`..`total` of the run `name`. BAR: tqdm's bar with the loss and
    images/s. LINES: a line at every tenth of the run and at least every `every_s` seconds, with the loss,
    images/s since the previous line and the ETA. QUIET: nothing."""

    def __init__(self, mode: str, total: int, start: int, name: str, every_s: float = 300.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter):
        self.mode, self.total, self.name, self.every_s, self.stream, self.clock = \
            mode, total, name, every_s, stream, clock
        self.start = self.at = self.shown_at = start
        self.began = self.shown_time = clock()
        self.images = 0
        self.bar = None
        if mode == BAR:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
                            file=sys.stderr if stream is None else stream)
        elif start < total:
            resumed = f", resuming at step {start}" if start else ""
            say(mode, f"pretraining {name}: {total} steps{resumed}", stream)

    def step(self, loss: float, images: int, seconds: float) -> None:
        """One optimiser step done: its loss, the images it read and how long it took."""
        self.at += 1
        self.images += images
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{images / seconds:.0f}")
            return
        if self.mode != LINES:
            return
        now = self.clock()
        tenth = 10 * self.at // self.total > 10 * self.shown_at // self.total
        if not (tenth or now - self.shown_time >= self.every_s or self.at == self.total):
            return
        rate = self.images / max(now - self.shown_time, 1e-9)
        if self.at < self.total:
            end = f"ETA {about((now - self.began) / (self.at - self.start) * (self.total - self.at))}"
        else:
            end = f"done in {now - self.began:.1f} s"
        say(self.mode, f"pretraining {self.name}: step {self.at}/{self.total} ({self.at / self.total:.0%}), "
                       f"loss {loss:.3f}, {rate:.0f} img/s, {end}", self.stream)
        self.shown_at, self.shown_time, self.images = self.at, now, 0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
