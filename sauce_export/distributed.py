"""torch.distributed under ``torchrun``: which rank does what, and how a failure on one rank ends all.

``torchrun --nproc-per-node N -m sauce_export run RECIPE --out DIR`` starts N copies of the CLI.
``init`` joins them (gloo on the CPU, nccl on CUDA); the pipeline then splits the collection rows and
the evaluation rows by rank, trains the SAE with DistributedDataParallel, and lets rank 0 alone
select, calibrate, fold, export and write the report while the others wait for its result.
Without torchrun (no ``WORLD_SIZE`` in the environment) every helper here is a no-op for one rank.
The run directory must be one filesystem for every rank (shards are written per rank, read by all).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from sauce_export.errors import CalibrationFailed, InputError, RankExit

T = TypeVar("T")

# Rank 0's single-rank stages (a 70B fold) may take hours while the others wait in a collective.
TIMEOUT = timedelta(hours=12)


def launched() -> bool:
    """True in a process that torchrun started (it sets WORLD_SIZE, RANK, MASTER_ADDR, ...)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (torchrun's RANK before ``init`` and after ``close``; 0 without torchrun)."""
    return dist.get_rank() if active() else int(os.environ.get("RANK", 0)) if launched() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: torch.device, device_map: str | None, where: str) -> torch.device:
    """Join torchrun's process group; returns this rank's device (``cuda:LOCAL_RANK`` on CUDA).

    gloo when the model runs on the CPU, nccl on CUDA. A ``device_map`` spreads one model over the
    GPUs that the ranks would each use: the two do not mix (bad input).
    """
    if not launched() or active():
        return device
    if device_map is not None:
        raise InputError(
            where, "runtime.device_map", "cannot be used under torchrun (each rank holds one model)"
        )
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def close() -> None:
    if active():
        dist.destroy_process_group()


def part(items: Sequence[T]) -> list[T]:
    """This rank's share of ``items``: every world()-th one from rank() (all of them on one rank)."""
    return list(items[rank() :: world()])


def gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (``[obj]`` on one rank)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (nccl reduces CUDA tensors: a CPU one makes a trip)."""
    if active() and dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        moved = tensor.cuda()
        dist.all_reduce(moved)
        tensor.copy_(moved)
    elif active():
        dist.all_reduce(tensor)
    return tensor


def _exit_code(err: BaseException) -> int:
    return 1 if isinstance(err, CalibrationFailed) else 2 if isinstance(err, InputError) else 3


def together(body: Callable[[], T]) -> T:
    """Run ``body`` on every rank; if it raises on any, every rank stops (the failing one with its
    exception, the others with RankExit) instead of waiting forever in the next collective."""
    if not active():
        return body()
    try:
        value, failure = body(), 0
    except BaseException as err:
        value, failure, raised = None, _exit_code(err), err
    codes = gather(failure)
    if failure:
        raise raised
    if any(codes):
        raise RankExit(max(codes))
    return value  # type: ignore[return-value]


def on_main(body: Callable[[], T]) -> T:
    """Run ``body`` on rank 0 only and hand its (picklable) result to every rank. A failed
    calibration is raised on every rank alike (a caller may catch it and go on: ``edit.method:
    auto`` then searches the subspace patch); any other failure ends the other ranks with RankExit."""
    if not active():
        return body()
    box: list[Any] = [None]
    if is_main():
        try:
            box = [("ok", body())]
        except CalibrationFailed as err:
            dist.broadcast_object_list([("calibration", (str(err), err.table))], src=0)
            raise
        except BaseException as err:
            dist.broadcast_object_list([("failed", _exit_code(err))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "calibration":
        raise CalibrationFailed(*value)
    if status == "failed":
        raise RankExit(value)
    return value
