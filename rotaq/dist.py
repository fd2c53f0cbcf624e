"""Calibration across processes (torch.distributed), and no-ops in a single process.

Started by ``torchrun --nproc-per-node N -m rotaq optimize ...`` (or ``rotaq optimize
--workers N``, which launches the same through :func:`launch`): every rank runs the same command on the same model;
calibration samples are split across ranks (:func:`shard`), per-block statistics summed
(:func:`allreduce_sum`), independent solves shared out round-robin (:func:`share`), and only
rank 0 writes files and prints (:func:`is_main`). Backend: NCCL when CUDA is available, gloo
otherwise. In one process (no ``WORLD_SIZE`` > 1 in the environment) every function is a no-op.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np

logger = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def _env_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def launched() -> bool:
    """Whether this process was started by torchrun (or ``--workers``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch(workers: int, argv: list[str]) -> int:
    """Run ``python -m rotaq ARGV`` on ``workers`` processes through torch.distributed.run;
    its exit code (the first failing rank's, else 0)."""
    import subprocess
    import sys

    if workers < 1:
        raise ValueError("workers must be >= 1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={workers}", "-m", "rotaq", *argv]
    logger.info("launching %d workers: %s", workers, " ".join(cmd))
    return subprocess.call(cmd)


def threads() -> int | None:
    """Threads per process for ONNX Runtime when several ranks share the machine (None:
    ORT's default)."""
    if not active():
        return None
    return max(1, (os.cpu_count() or 1) // world()[1])


def init() -> None:
    """Join the process group torchrun described in the environment (once; no-op when alone)."""
    if _env_size() <= 1:
        return
    import torch
    import torch.distributed as td

    if td.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    td.init_process_group(backend=backend)
    logger.info("rank %d of %d (%s)", td.get_rank(), td.get_world_size(), backend)


def active() -> bool:
    """True inside an initialized process group of more than one rank."""
    if _env_size() <= 1:
        return False
    import torch.distributed as td

    return td.is_available() and td.is_initialized() and td.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, size): (0, 1) in a single process."""
    if not active():
        return 0, 1
    import torch.distributed as td

    return td.get_rank(), td.get_world_size()


def is_main() -> bool:
    """Whether this process writes outputs and prints reports (rank 0)."""
    return world()[0] == 0


def shard(n: int) -> slice:
    """This rank's contiguous share of ``n`` samples (sizes differ by at most one)."""
    rank, size = world()
    return slice(rank * n // size, (rank + 1) * n // size)


def allreduce_sum(a: np.ndarray) -> np.ndarray:
    """The sum of ``a`` over all ranks (a new float64 array; ``a`` itself when alone)."""
    if not active():
        return a
    import torch
    import torch.distributed as td

    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))
    td.all_reduce(t, op=td.ReduceOp.SUM)
    return t.numpy()


def allreduce_int(x: int) -> int:
    """The sum of an integer (e.g. token counts) over all ranks."""
    return int(allreduce_sum(np.array([x], np.float64))[0])


def share(items: Sequence[T], solve: Callable[[T], R]) -> list[R]:
    """``[solve(x) for x in items]``, item i solved on rank ``i % size``; every rank gets every
    result, in order."""
    rank, size = world()
    mine = {i: solve(x) for i, x in enumerate(items) if i % size == rank}
    if size == 1:
        return [mine[i] for i in range(len(items))]
    import torch.distributed as td

    gathered: list[Any] = [None] * size
    td.all_gather_object(gathered, mine)
    merged: dict[int, R] = {}
    for part in gathered:
        merged.update(part)
    return [merged[i] for i in range(len(items))]


def gather_rows(a: np.ndarray) -> np.ndarray:
    """The rows of ``a`` of every rank, concatenated in rank order (``a`` itself when alone)."""
    if not active():
        return a
    import torch.distributed as td

    parts: list[Any] = [None] * world()[1]
    td.all_gather_object(parts, np.ascontiguousarray(a))
    return np.concatenate(parts, axis=0)


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` as rank ``src`` holds it, on every rank."""
    if not active():
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if active():
        import torch.distributed as td

        td.barrier()


def finish() -> None:
    """Leave the process group (end of a command)."""
    if active():
        import torch.distributed as td

        td.destroy_process_group()
