"""Runs launched as several processes (``accelerate launch``, ``torchrun``): this process's rank and device.

Training stages run on every process as DDP (:mod:`streamify.distill.trainer`);
every process runs the stages before the last training stage (they are
deterministic, so all hold the same model), and the main process alone runs
the stages after it, writes the artifact, evaluates and logs.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

# How long a process waits in a collective: the others wait while the main process alone verifies the source
# or evaluates it before training, which can take hours on a large model (NCCL's default is 10 minutes).
WAIT = timedelta(hours=6)


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_state(requested: torch.device):
    """accelerate's ``PartialState`` for this process (sets up the process group: NCCL on GPUs, gloo on CPUs,
    with a :data:`WAIT` timeout)."""
    from accelerate import PartialState

    return PartialState(cpu=requested.type == "cpu" or not torch.cuda.is_available(), timeout=WAIT)


def process_device(requested: torch.device) -> torch.device:
    """The device of this process: the requested one on one process; under a launcher, this rank's own GPU
    (``cuda:LOCAL_RANK``) when one is asked for and present, else the CPU."""
    if launched_processes() == 1:
        return requested
    device = process_state(requested).device
    return torch.device("cpu") if device.type == "cpu" else device
