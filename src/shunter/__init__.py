"""Shunter: run Mixture-of-Experts models fast where memory or network is the bottleneck."""

from shunter.errors import ShunterError

__all__ = ["ShunterError"]
__version__ = "0.1.0"
