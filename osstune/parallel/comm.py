"""Time spent in communication: the collectives of one sampled step, read from torch.profiler.

FSDP2 issues its all-gathers and reduce-scatters itself (on side streams on a GPU), so there is no
call of ours to time. On a sampled step the profiler records them: on CUDA the NCCL kernels' device
time (overlapped with compute or not), on the CPU the gloo operations' time. One step out of
`every` pays the profiler's overhead; the others run untouched.
"""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile


class CommMeter:
    def __init__(self, every: int, device: torch.device) -> None:
        self.every, self.device = every, device
        self.last: float | None = None
        self._prof: profile | None = None

    def start(self, index: int) -> None:
        """At the start of optimizer step `index` (0-based): profile it when it is a sampled one."""
        if not self.every or index % self.every:
            return
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._prof = profile(activities=activities)
        self._prof.__enter__()

    def stop(self) -> None:
        """At the end of the step (after the optimizer)."""
        if self._prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        self.last = comm_seconds(prof.events(), cuda=self.device.type == "cuda")

    def take(self) -> float | None:
        """The latest measurement, once."""
        value, self.last = self.last, None
        return value


def comm_seconds(events, cuda: bool) -> float:
    total_us = 0.0
    for e in events:
        name = e.name.lower()
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA and "nccl" in name:
            total_us += e.device_time
        elif not cuda and name.startswith("gloo:"):
            total_us += e.cpu_time
    return total_us / 1e6
