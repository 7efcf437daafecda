"""sgn-lab on torch.distributed: noise statistics gathered across ranks.

:mod:`sgn_lab.distributed.gns` measures the simple noise scale B_simple during DDP training from
the gradient norms around DDP's all-reduce (McCandlish et al. 2018, Appendix A).
"""

from sgn_lab.distributed.gns import GradientNoiseScale, NoiseScaleTracker, gns_hook

__all__ = ["GradientNoiseScale", "NoiseScaleTracker", "gns_hook"]
