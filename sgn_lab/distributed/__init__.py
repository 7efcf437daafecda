"""sgn-lab on torch.distributed: noise statistics over several processes.

- :class:`Ranks` — a process's place in a group and the split of the probe set
  (:mod:`~sgn_lab.distributed.ranks`); :func:`unwrapped` (from :mod:`sgn_lab.models.wrapped`):
  the module inside DDP, an FSDP2 model measured on its gathered parameters, FSDP1 and
  tensor parallelism refused.
- :func:`shard_blocks` and :class:`ShardedNoiseScale` — training sharded with FSDP2 and its
  noise scale (:mod:`~sgn_lab.distributed.fsdp`).
- :func:`split_gram` — the Gram, mean and diag(S) of a probe set split over ranks, the
  off-diagonal blocks from factors or gradients sent between them
  (:mod:`~sgn_lab.distributed.gram_over_ranks`).
- :func:`launch`, :func:`init_from_env` and :func:`destroy_group` — ``--nproc N`` through
  torchrun's engine, or joining torchrun's group and leaving it
  (:mod:`~sgn_lab.distributed.launch`).
- :class:`GradientNoiseScale` and :func:`gns_hook` — B_simple during DDP training from the
  gradient norms around DDP's all-reduce (McCandlish et al. 2018, Appendix A;
  :mod:`~sgn_lab.distributed.gns`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sgn_lab.distributed.gns import GradientNoiseScale, NoiseScaleTracker, gns_hook
from sgn_lab.distributed.gram_over_ranks import SplitGram, split_gram
from sgn_lab.distributed.launch import WorkerError, destroy_group, init_from_env, launch
from sgn_lab.distributed.ranks import Ranks
from sgn_lab.lazy import homes, lazy_exports
from sgn_lab.models.wrapped import unwrapped

# FSDP's names are imported on first use (sgn_lab.lazy): their module loads torch's DTensor
# machinery, which every command would otherwise pay for at start-up (0.7 s).
__getattr__, __dir__, _ = lazy_exports(
    __name__, homes("sgn_lab.distributed.fsdp", ("ShardedNoiseScale", "shard_blocks")))

if TYPE_CHECKING:  # the same names, for type checkers and editors
    from sgn_lab.distributed.fsdp import ShardedNoiseScale, shard_blocks

__all__ = ["GradientNoiseScale", "NoiseScaleTracker", "Ranks", "ShardedNoiseScale", "SplitGram",
           "WorkerError", "destroy_group", "gns_hook", "init_from_env", "launch",
           "shard_blocks", "split_gram", "unwrapped"]
