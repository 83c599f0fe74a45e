"""normswap: rewrite the normalization layers of trained PyTorch networks."""

from __future__ import annotations

__version__ = "0.1.0"
