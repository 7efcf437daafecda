"""Starting the processes of a run: ``--nproc N`` through torchrun's own engine, or torchrun.

:func:`launch` runs a function in N processes on this machine with the elastic agent behind
``torchrun --standalone`` (:func:`torch.distributed.launcher.api.elastic_launch`, a c10d
rendezvous on a free localhost port, no restarts): the agent watches the workers, and when
one fails or dies it stops the others and reports which. :func:`init_from_env` joins the
process group that ``torchrun`` (or any launcher setting ``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``) describes. Either way the backend is NCCL for a CUDA run
(each process on the GPU of its local rank) and gloo on CPUs.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from sgn_lab.distributed.ranks import Ranks

# Exceptions that mean bad input (a one-line error, exit code 2 on the CLI), by name: a
# worker's exception reaches the launcher as text.
INPUT_ERRORS = ("ValueError", "TypeError", "FileNotFoundError", "FloatingPointError",
                "OSError", "RunDirError", "GramMismatchError", "PermissionError")
INTERRUPTED = 130  # a worker's exit code when Ctrl-C reached it (128 + SIGINT)
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer ends the run


class WorkerError(RuntimeError):
    """A process of the run failed (``input_error``: with one of :data:`INPUT_ERRORS`) or
    died; the message names its rank and what happened."""

    def __init__(self, message: str, *, rank: int, input_error: bool) -> None:
        super().__init__(message)
        self.rank, self.input_error = rank, input_error


def backend() -> str:
    """gloo for CPU tensors, and NCCL for CUDA ones where CUDA is present."""
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"


def world_size_from_env() -> int:
    """The number of processes a launcher such as torchrun started (1 when none did)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init_from_env() -> Ranks:
    """Join the process group described by the environment (torchrun's variables); with CUDA,
    each process takes the GPU of its local rank."""
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        _share_cores()
        dist.init_process_group(backend(), timeout=TIMEOUT)
    return Ranks.of()


def destroy_group() -> None:
    """Leave the process group (:func:`torch.distributed.destroy_process_group`) once the
    objects that used it are gone. A DDP model, its reducer and gloo's work records can sit
    in reference cycles; freed only at interpreter exit, after the group, they abort the
    process (``terminate called without an active exception``, about one run in six)."""
    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(nproc: int, fn: Callable[..., Any], *args: Any, device_type: str = "cpu"
           ) -> dict[int, Any]:
    """``fn(*args)`` in ``nproc`` processes on this machine, each inside the process group;
    returns each rank's result. ``fn`` is called as ``fn(ranks, *args)`` and must be
    importable (a module-level function); ``device_type`` "cuda" needs ``nproc`` GPUs. A
    failed or dead process is a :class:`WorkerError`."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if device_type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} processes need as many GPUs; torch sees "
                         f"{torch.cuda.device_count()}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"sgn-lab-{uuid.uuid4().hex[:8]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn")
    try:
        with _quiet_agent():
            return elastic_launch(config, _worker)(fn, *args)
    except SignalException:
        # Ctrl-C or SIGTERM reached the agent, which has stopped the workers: an interrupted
        # run, as in one process (every finished measurement is on disk).
        raise KeyboardInterrupt from None
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        if failure.exitcode == INTERRUPTED:  # a worker was interrupted before the agent was
            raise KeyboardInterrupt from None
        raise _worker_error(rank, nproc, failure) from None


def _worker(fn: Callable[..., Any], *args: Any) -> Any:
    from torch.distributed.elastic.multiprocessing.errors import record

    @record
    def run() -> Any:
        ranks = init_from_env()
        try:
            return fn(ranks, *args)
        finally:
            destroy_group()

    try:
        return run()
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal's group
        sys.exit(INTERRUPTED)  # quietly: the launcher reports it once


def _share_cores() -> None:
    """Each of a machine's CPU processes takes its share of the cores (torchrun sets
    OMP_NUM_THREADS=1 for the same reason), unless the user set the threads."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def _worker_error(rank: int, nproc: int, failure: Any) -> WorkerError:
    if failure.exitcode < 0:
        try:
            name = signal.Signals(-failure.exitcode).name
        except ValueError:
            name = f"signal {-failure.exitcode}"
        return WorkerError(f"the process of rank {rank} of {nproc} died ({name})", rank=rank,
                           input_error=False)
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message).strip().splitlines()[0] if str(message).strip() else (
        f"exit code {failure.exitcode}")
    kind, _, detail = text.partition(": ")
    if kind in INPUT_ERRORS and detail:
        return WorkerError(detail, rank=rank, input_error=True)
    return WorkerError(f"the process of rank {rank} of {nproc} failed: {text}", rank=rank,
                       input_error=False)


@contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs every worker's traceback and its own shutdown; the caller reports the
    first failure in one line instead."""
    loggers = [logging.getLogger(name) for name in
               ("torch.distributed.elastic", "torch.distributed.launcher",
                "torch.multiprocessing")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
