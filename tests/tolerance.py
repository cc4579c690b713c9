"""Tolerances of the test suite, stated in units of float32 rounding.

``EPS`` is float32's machine epsilon (2**-23 ≈ 1.19e-7): the spacing of float32 numbers at 1. A tolerance of
``n * EPS`` accepts ``n`` roundings at magnitude 1; results that sum many terms (a matmul over d_model, a log-softmax
over the vocabulary) differ by tens of EPS between CPU kernels (AVX2, AVX-512, AMX) and library versions, which
reorder the sums. Tolerances of 16 EPS or less are tight: each says why in a comment where it is used.
``BF16_EPS`` (2**-7) is the same unit for bfloat16.
"""

import torch

EPS = torch.finfo(torch.float32).eps
BF16_EPS = torch.finfo(torch.bfloat16).eps

# Tight: two routes to the same float32 computation on this machine (from a cache or a fresh forward pass, one row of
# a batch or a single run, a saved result or the one in memory, the same numbers in another dtype's container): the
# kernels may reorder a sum, so a few roundings apart, never more. Numbers saved on another machine or by another
# library version are not "the same computation": compare them with a tolerance that scales with their size.
TIGHT = 16 * EPS
