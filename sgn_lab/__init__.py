"""sgn-lab: measure stochastic gradient noise (SGN) in PyTorch models."""

__version__ = "0.1.0"
