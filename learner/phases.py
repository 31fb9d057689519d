"""Where a learner step's time goes: wall seconds per phase, summed over the step's micro-batches.

    clock = PhaseClock(device)
    with clock("forward"):
        ...
    clock.seconds()  # {"forward": 0.42, ...}; on a GPU this is the step's one host sync for the clock

On CPU a phase is its wall time (``time.perf_counter``). On a GPU, kernels run asynchronously, so a
host timer would charge a phase for whatever it waits on; instead each phase boundary records a CUDA
event on the current stream and ``seconds`` reads the gaps between consecutive events once, at the end
of the step. The events partition the stream's timeline: a host phase the GPU did not wait for (the
next micro-batch's collate while the previous backward runs) shows up as ~0, one it did wait for as its
length. Phases nest nowhere: each ``with`` block is one interval; repeated names add up.
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseClock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._intervals: list[tuple[str, object, object]] = []

    def _mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    @contextmanager
    def __call__(self, phase: str):
        start = self._mark()
        try:
            yield
        finally:
            self._intervals.append((phase, start, self._mark()))

    def seconds(self) -> dict[str, float]:
        """Seconds per phase since the clock was made (or last read); resets it."""
        if self.cuda and self._intervals:
            self._intervals[-1][2].synchronize()
        out: dict[str, float] = defaultdict(float)
        for phase, start, end in self._intervals:
            out[phase] += start.elapsed_time(end) / 1000 if self.cuda else end - start
        self._intervals = []
        return dict(out)
