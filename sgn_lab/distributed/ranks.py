"""The ranks of a process group, as the probe and the training loop use them.

:class:`Ranks` is the one place that knows how the probe set is split over processes and how
partial results travel: sums by all-reduce, row blocks by broadcasting each rank's block in
turn (ranks may hold unequal numbers of rows, which ``all_gather`` does not allow) or by
sending them to rank 0 alone (:meth:`Ranks.gather_rows_to_root`). It counts
the bytes each call moves so that benchmarks report measured communication volumes.

Split of n samples over N ranks (:meth:`Ranks.shard`): contiguous blocks in probe order, the
first ``n mod N`` ranks one sample more than the others, so ranks 0..N-1 hold samples
[0, n_0), [n_0, n_0 + n_1), ... and concatenating the blocks in rank order gives the probe
order back.
"""

from __future__ import annotations

import pickle
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Ranks:
    """This process's place in a process group (``size`` 1: a single process, no group).

    ``traffic`` counts the bytes this rank received, by kind (``sum``, ``rows``, ``objects``
    and the caller's labels), over the lifetime of the object.
    """

    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    traffic: Counter = field(default_factory=Counter, repr=False, compare=False)

    @classmethod
    def of(cls, group: dist.ProcessGroup | None = None) -> Ranks:
        """The ranks of ``group`` (None: the default group) of an initialised torch.distributed;
        a single process when torch.distributed is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            if group is not None:
                raise RuntimeError("a process group was given but torch.distributed is not "
                                   "initialised")
            return cls()
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def bounds(self, n: int) -> list[tuple[int, int]]:
        """[lo, hi) of every rank's block of n samples (see the module docstring)."""
        base, extra = divmod(n, self.size)
        edges = [0]
        for r in range(self.size):
            edges.append(edges[-1] + base + (1 if r < extra else 0))
        return list(zip(edges[:-1], edges[1:], strict=True))

    def shard(self, n: int) -> slice:
        """This rank's block of n samples."""
        lo, hi = self.bounds(n)[self.rank]
        return slice(lo, hi)

    def device(self, like: Tensor | None = None) -> torch.device:
        """Where collectives run: CUDA where NCCL is the group's backend, else the CPU."""
        if self.distributed and "nccl" in str(dist.get_backend(self.group)):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu") if like is None else like.device

    def sum(self, tensor: Tensor) -> Tensor:
        """The sum of ``tensor`` over ranks (a new tensor on the input's device)."""
        if not self.distributed:
            return tensor.clone()
        return self._all_reduce(tensor.to(self.device(tensor), copy=True)).to(tensor.device)

    def sum_(self, tensor: Tensor) -> Tensor:
        """In place: ``tensor`` becomes its sum over ranks, and is returned (no second copy
        where the group's backend takes the tensor's device)."""
        if not self.distributed:
            return tensor
        if self.device(tensor) != tensor.device:
            return tensor.copy_(self.sum(tensor))
        return self._all_reduce(tensor)

    def _all_reduce(self, tensor: Tensor) -> Tensor:
        dist.all_reduce(tensor, group=self.group)
        self.traffic["sum"] += _bytes(tensor)
        return tensor

    def broadcast_object(self, obj: object, src: int = 0) -> object:
        """A small picklable object from rank ``src`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group,
                                   device=self.device())
        if self.rank != src:
            self.traffic["objects"] += len(pickle.dumps(box[0]))
        return box[0]

    def broadcast_tensors(self, tensors: list[Tensor] | None, src: int, *, kind: str
                          ) -> list[Tensor]:
        """Rank ``src``'s list of tensors on every rank (others pass None); shapes and dtypes
        travel first as a small object. Received tensors land on ``src``'s device type here."""
        if not self.distributed:
            assert tensors is not None
            return tensors
        specs = self.broadcast_object(
            [(tuple(t.shape), t.dtype) for t in tensors] if self.rank == src else None, src)
        device = self.device(tensors[0] if self.rank == src and tensors else None)
        out = []
        for i, (shape, dtype) in enumerate(specs):
            if self.rank == src:
                buffer = tensors[i].detach().contiguous().to(device)
            else:
                buffer = torch.empty(shape, dtype=dtype, device=device)
            dist.broadcast(buffer, src=self._global(src), group=self.group)
            if self.rank != src:
                self.traffic[kind] += _bytes(buffer)
            out.append(buffer)
        return out

    def gather_rows(self, local: Tensor, *, kind: str = "rows") -> Tensor:
        """Every rank's block of rows (dim 0), concatenated in rank order, on every rank."""
        if not self.distributed:
            return local
        blocks = [self.broadcast_tensors([local] if r == self.rank else None, r, kind=kind)[0]
                  for r in range(self.size)]
        return torch.cat([b.to(local.device) for b in blocks])

    def gather_rows_to_root(self, local: Tensor, *, kind: str = "rows") -> Tensor | None:
        """Every rank's block of rows (dim 0), concatenated in rank order, on rank 0; None on
        the others, which send theirs (point to point) and hold nothing more."""
        if not self.distributed:
            return local
        device = self.device(local)
        rows = torch.tensor([len(local)], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(rows) for _ in range(self.size)]
        dist.all_gather(counts, rows, group=self.group)
        if not self.is_root:
            dist.send(local.detach().contiguous().to(device), dst=self._global(0),
                      group=self.group)
            return None
        blocks = [local.detach().to(device)]
        for r in range(1, self.size):
            buffer = torch.empty((int(counts[r]), *local.shape[1:]), dtype=local.dtype,
                                 device=device)
            dist.recv(buffer, src=self._global(r), group=self.group)
            self.traffic[kind] += _bytes(buffer)
            blocks.append(buffer)
        return torch.cat(blocks).to(local.device)

    def decided(self, decide: Callable[[], Any]) -> Any:
        """``decide()`` run on rank 0 alone, its result (or its ValueError, raised) on every
        rank: planning, locking and reading files happen once, and a refusal reaches every
        rank instead of leaving the others waiting in a collective."""
        if not self.distributed:
            return decide()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_root:
            try:
                outcome = ("ok", decide())
            except ValueError as exc:
                outcome = ("error", str(exc))
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise ValueError(outcome[1])
        return outcome[1]

    def once(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0 alone and its result, or the exception it raised (its own
        type), on every rank: work whose result is the same everywhere (the spectrum of the
        assembled Gram) is done once instead of N times. The result must be picklable and
        small (it is broadcast)."""
        if not self.distributed:
            return compute()
        outcome: tuple[str, Any] = ("ok", None)
        if self.is_root:
            try:
                outcome = ("ok", compute())
            except Exception as exc:  # every rank raises it, none waits in a collective
                outcome = ("error", exc)
        outcome = self.broadcast_object(outcome)
        if outcome[0] == "error":
            raise outcome[1]
        return outcome[1]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(group=self.group)

    def cross_tasks(self) -> list[tuple[int, int, float, float]]:
        """The off-diagonal blocks of a pairwise matrix this rank computes, as (r, s, lo, hi):
        rows of rank r's samples from fraction lo to hi, against all of rank s's samples.

        Every pair of ranks is computed once, about (N−1)/2 blocks per rank: rank r takes the
        pair (r, s) when s follows r by less than half way round; at exactly half way (even N,
        the only pair when N = 2) the two ranks take half of the block's rows each.
        """
        tasks = []
        for other in range(self.size):
            ahead = (other - self.rank) % self.size
            if ahead == 0 or ahead > self.size - ahead:
                continue
            if ahead < self.size - ahead:
                tasks.append((self.rank, other, 0.0, 1.0))
            else:
                low, high = sorted((self.rank, other))
                tasks.append((low, high, 0.0, 0.5) if self.rank == low else (low, high, 0.5, 1.0))
        return tasks

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)


def _bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()

