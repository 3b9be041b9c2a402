"""Three iterative tasks that no training default was tuned on, for the seed sweep of the plain command.

Chosen and written down before any of them was trained (``benchmarks/results/untuned_tasks.md``). Each is named
from the command line by its import string, e.g. ``hf-iterheads train --task benchmarks.untuned_tasks:affine7``
run from the repository root (the current directory is on the import path).

* ``affine7``    -- ``s_t = 2 s_(t-1) + x_t mod 7``, inputs 0..6: an affine map, order matters.
* ``a4_product`` -- ``s_t = s_(t-1) o x_t`` in the alternating group A4 (12 even permutations of 4 points, ids in
  lexicographic order): non-abelian, twice S3's size.
* ``poly23``     -- ``s_t = s_(t-1) * x_t + 1 mod 23``, inputs 1..22: 23 states, and state 0 makes a step ignore its
  input (``s_t = 1``), so ``x_t`` is not recoverable from every step.
"""

from __future__ import annotations

import itertools

import numpy as np

from hf_iterheads import IterativeTask

A4_ELEMENTS = tuple(p for p in itertools.permutations(range(4))
                    if sum(p[i] > p[j] for i in range(4) for j in range(i + 1, 4)) % 2 == 0)
# A4_TABLE[a, b] = index of i -> a(b(i)): "apply b, then a" (the convention of hf_iterheads.tasks.S3_TABLE)
A4_TABLE = np.array([[A4_ELEMENTS.index(tuple(a[b[i]] for i in range(4))) for b in A4_ELEMENTS] for a in A4_ELEMENTS])

affine7 = IterativeTask("affine7", inputs=range(7), states=range(7), step=lambda s, x: (2 * s + x) % 7,
                        description="affine map mod 7: s_t = 2 s_(t-1) + x_t mod 7 (s_1 = x_1)")
a4_product = IterativeTask("a4_product", inputs=range(12), states=range(12), step=lambda s, x: A4_TABLE[s, x],
                           description="product in the alternating group A4: s_t = s_(t-1) o x_t (s_1 = x_1)")
poly23 = IterativeTask("poly23", inputs=range(1, 23), states=range(23), step=lambda s, x: (s * x + 1) % 23,
                       description="polynomial iteration mod 23: s_t = s_(t-1) * x_t + 1 mod 23 (s_1 = x_1)")
