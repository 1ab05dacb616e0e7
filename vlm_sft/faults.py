"""Faults during a run: preemption signals, divergence, and the process exit codes that report them.

Preemption. Slurm (`--signal`, preemption) and Kubernetes send SIGTERM or SIGUSR1 some time before they kill a job.
The handler only records the signal; the training loop asks `Preemption.agreed` at each step boundary, whose answer
rides on the all-reduce of the step's metrics that every step already does (no extra collective), so every rank
stops after the same step, saves a checkpoint of it together and exits with EXIT_PREEMPTED. SIGINT (Ctrl-C) does
the same once; a second SIGINT more than a second later stops at once, without a checkpoint (under torchrun a
Ctrl-C reaches a worker twice within milliseconds: from the terminal and forwarded by torchrun).

Divergence. train_step skips an update whose gradient norm is not finite; `DivergenceGuard` stops the run after
`runner.max_consecutive_skipped_steps` skips in a row, naming the steps and the newest checkpoint saved before them.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import torch
import torch.distributed
from absl import logging

# Exit codes of `python -m vlm_sft.main` besides 0 (done) and 1 (a bad input or failure, named on the last line);
# README "Long jobs and faults". Under torchrun each worker exits with its code; torchrun reports it and exits 1.
EXIT_DIVERGED = 3       # max_consecutive_skipped_steps non-finite steps in a row
EXIT_PREEMPTED = 75     # signalled: the current step's checkpoint is saved; rerun the same command to continue
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, nothing saved

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_SECOND_SIGINT_AFTER_S = 1.0


class Preempted(Exception):
    """Every rank stopped after the same step on a signal, its checkpoint saved; the message says where."""


class Diverged(RuntimeError):
    """The run stopped because too many updates in a row were skipped; the message names steps and checkpoint."""


class Preemption:
    """Records SIGTERM / SIGUSR1 / SIGINT. Install in the main thread once the run starts; `restore` undoes it."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._first_sigint: float | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> "Preemption":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._first_sigint is not None and now - self._first_sigint > _SECOND_SIGINT_AFTER_S:
                _say("vlm-sft: second interrupt: stopping now, without a checkpoint")
                os._exit(EXIT_INTERRUPTED)
            self._first_sigint = self._first_sigint or now
        if self.signal_name is None:
            self.signal_name = signal.Signals(signum).name
            _say(f"vlm-sft: {self.signal_name} received: finishing this step, then saving a checkpoint and exiting "
                 f"with code {EXIT_PREEMPTED}")

    @property
    def requested(self) -> bool:
        """This rank was signalled (ranks may differ: combine with `agreed`)."""
        return self.signal_name is not None

    @staticmethod
    def agreed(any_rank_signalled: float) -> bool:
        """The all-reduced (summed) `requested` flags: True on every rank if any rank was signalled."""
        return any_rank_signalled > 0


def _say(line: str) -> None:
    """From a signal handler: no logging and no buffered stream (the interrupted frame may hold their locks)."""
    os.write(2, (line + "\n").encode())


@dataclasses.dataclass
class DivergenceGuard:
    """Counts consecutive skipped updates (train/skipped_update is global: every rank counts the same)."""

    max_consecutive: int
    first_skipped: int | None = None
    good_checkpoint: str | None = None  # the newest checkpoint saved before the current run of skips

    def update(self, step: int, skipped: bool) -> None:
        """Raises Diverged when `step` makes max_consecutive skipped updates in a row."""
        if not skipped:
            self.first_skipped = None
            return
        if self.first_skipped is None:
            self.first_skipped = step
            logging.warning("step %d: loss or gradient not finite; update skipped", step)
        count = step - self.first_skipped + 1
        if self.max_consecutive > 0 and count >= self.max_consecutive:
            where = (f"the last good checkpoint is {self.good_checkpoint}" if self.good_checkpoint else
                     "no checkpoint was saved before them")
            raise Diverged(
                f"training diverged: the updates of steps {self.first_skipped}..{step} ({count} in a row, "
                f"runner.max_consecutive_skipped_steps={self.max_consecutive}) were skipped because the loss or "
                f"gradient was not finite; {where}. Lower actor.optim.lr or check the data, and resume from a good "
                "checkpoint with runner.resume=<path>")

    def saved(self, path: str) -> None:
        """A checkpoint was written; it is good when no skip is in progress (skips leave the state unchanged, but a
        checkpoint taken mid-run of skips resumes into the same failure)."""
        if self.first_skipped is None:
            self.good_checkpoint = path


def is_collective_failure(e: BaseException) -> bool:
    """A collective failed because a peer died or timed out. torch raises DistError subclasses for most backends,
    but gloo's timeouts and closed connections arrive as a RuntimeError naming gloo's source file."""
    if isinstance(e, torch.distributed.DistError):
        return True
    return isinstance(e, RuntimeError) and "gloo/transport" in str(e)


# Test-only: VLM_SFT_TEST_STALL="<rank>:<step>:<seconds>" makes that rank sleep before that step, as a stalled
# filesystem read would. Read here and nowhere else.
_STALL_ENV = "VLM_SFT_TEST_STALL"


def stall_for_tests(rank: int, step: int) -> None:
    value = os.environ.get(_STALL_ENV)
    if not value:
        return
    stall_rank, stall_step, seconds = value.split(":")
    if int(stall_rank) == rank and int(stall_step) == step:
        logging.warning("%s: rank %d stalls %s s before step %d", _STALL_ENV, rank, seconds, step)
        time.sleep(float(seconds))
