"""Several processes for one certification, on torch.distributed (launched by ``torchrun``).

``torchrun --nproc-per-node N -m robust_cert certify …`` (``--nnodes`` for several machines)
starts N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT`` set. Each loads the model and the data, runs its share of every shardable
metric's blocks of points (:attr:`robust_cert.metrics.base.Metric.shardable`), and sends its
per-block results to rank 0, which merges them in block order, runs the rest and alone writes
anything (MLflow, certificate, report). Blocks are seeded by their first point, so the
certificate does not depend on the number of processes.

Every exchange is an ``all_gather_object`` of ``(error, payload)`` on a gloo group (the
results are small Python objects; NCCL, when CUDA is present, is the default group's backend
for anything else): a process that fails sends its error instead of a payload at the next
exchange, and every process then raises it. A process that dies outright is torchrun's to
handle: it stops the others, and nothing has been written.

Environment: ``ROBUST_CERT_JOIN_TIMEOUT`` (seconds the processes wait for each other to
start, default 300) and ``ROBUST_CERT_EXCHANGE_TIMEOUT`` (seconds a process waits at an
exchange for the slowest one, default 86,400: a rank may run for hours).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, cast

from robust_cert.errors import RobustCertError

if TYPE_CHECKING:  # torch.distributed is imported when a run has several processes
    from torch.distributed import ProcessGroup

log = logging.getLogger(__name__)

JOIN_TIMEOUT_ENV = "ROBUST_CERT_JOIN_TIMEOUT"
EXCHANGE_TIMEOUT_ENV = "ROBUST_CERT_EXCHANGE_TIMEOUT"
DEFAULT_JOIN_TIMEOUT_S = 300.0
DEFAULT_EXCHANGE_TIMEOUT_S = 86_400.0


class RankFailed(RobustCertError):
    """Another process of the run failed; the message is its error, with its rank."""


@dataclass
class World:
    """The processes of one certification. ``World()`` is a single process (no exchange)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: ProcessGroup | None = field(default=None, repr=False)

    @property
    def main(self) -> bool:
        """True on the process that merges results and writes (rank 0)."""
        return self.rank == 0

    def share(self, n_items: int) -> range:
        """This process's consecutive share of ``n_items`` (blocks): sizes differ by at most
        one, earlier ranks take the larger shares; a rank beyond the items gets none."""
        base, extra = divmod(n_items, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    def exchange(self, payload, error: BaseException | None = None) -> list:
        """Every process's ``payload``, in rank order; raises :class:`RankFailed` on every
        process (the lowest failing rank's error) when one of them passes an ``error``."""
        if self.size == 1:
            if error is not None:
                raise error
            return [payload]
        import torch.distributed as dist

        mine = (None if error is None else _describe(error), None if error else payload)
        out: list = [None] * self.size
        dist.all_gather_object(out, mine, group=self.group)
        failed = next(((rank, err) for rank, (err, _) in enumerate(out) if err is not None),
                      None)
        if failed is None:
            return [p for _, p in out]
        rank, err = failed
        if self.main:  # said before the barrier: no process exits (and torchrun stops the
            # others) until rank 0 has written the error
            log.error("process %d of %d failed: %s", rank, self.size, err)
        dist.barrier(group=self.group)
        if error is not None and rank == self.rank:
            raise error
        raise RankFailed(f"process {rank} of {self.size} failed: {err}")

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if self.size == 1:
            return obj
        return self.exchange(obj if self.main else None)[0]


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, RobustCertError) else f"{type(exc).__name__}: {text}"


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise RobustCertError(f"{env}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise RobustCertError(f"{env} must be > 0 seconds, got {raw}")
    return value


_WORLD: World | None = None


def launched() -> bool:
    """True when this process was started as one of several (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def world() -> World:
    """The processes of this run: joins the process group on first call when launched by
    torchrun (``WORLD_SIZE`` > 1), else a single process. Raises RobustCertError naming the
    address and timeout when the others do not join in time."""
    global _WORLD
    if _WORLD is not None:
        return _WORLD
    if not launched():
        _WORLD = World()
        return _WORLD
    import torch
    import torch.distributed as dist

    try:
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError) as exc:
        raise RobustCertError(f"WORLD_SIZE is set but {exc} is missing or not an integer: "
                              "launch several processes with torchrun") from None
    join = _seconds(JOIN_TIMEOUT_ENV, DEFAULT_JOIN_TIMEOUT_S)
    exchange = _seconds(EXCHANGE_TIMEOUT_ENV, DEFAULT_EXCHANGE_TIMEOUT_S)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local % torch.cuda.device_count())
        try:
            dist.init_process_group(backend, timeout=timedelta(seconds=join))
        except (RuntimeError, ValueError, TimeoutError) as exc:  # DistError is a RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RobustCertError(
                f"process {rank} of {size} could not join the others at {where} within "
                f"{join:g} s ({first}): check that every node was started with the same "
                f"--nnodes/--nproc-per-node and can reach {where}; raise {JOIN_TIMEOUT_ENV} "
                "for slow starts") from None
    # every rank is a member, so a ProcessGroup (not new_group's int for a non-member)
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=exchange))
    _WORLD = World(rank=rank, size=size, local_rank=local, group=cast("ProcessGroup", group))
    # leave the group before the interpreter tears down: a live gloo group at exit can
    # abort the process (std::terminate from its threads), which torchrun reports as a crash
    import atexit

    atexit.register(shutdown)
    log.info("process %d of %d (local rank %d), exchanging over %s", rank, size, local, where)
    return _WORLD


def device_for(world_: World, device):
    """``auto``/None on a multi-process CUDA run: the local rank's GPU; else ``device``."""
    import torch

    if world_.size > 1 and (device is None or str(device) == "auto") \
            and torch.cuda.is_available():
        return f"cuda:{world_.local_rank % torch.cuda.device_count()}"
    return device


def shutdown() -> None:
    """Leave the process group (end of a launched run)."""
    global _WORLD
    if _WORLD is not None and _WORLD.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _WORLD = None
