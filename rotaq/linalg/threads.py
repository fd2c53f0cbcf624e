"""Thread limits for many small factorizations.

On small machines BLAS and torch thread pools oversubscribe the cores: a 576 x 1536 SVD ran 3x
and a 1536 x 1536 Cholesky 8x slower with the default pools than on one thread (2 cores, other
work running), and a 64 x 64 autograd loop 200x. Loops over layers therefore run their math on
one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS (via threadpoolctl) and torch intra-op pools limited to one thread."""
    import torch
    from threadpoolctl import threadpool_limits

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(n)
