"""lsts: distributed long-sequence training.

The sequence-parallel attention core lives in `lsts.parallel`; local kernels in `lsts.kernels`.
"""

__version__ = "0.1.0"
