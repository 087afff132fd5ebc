"""One switch for every thread pool a study uses: torch's and the BLAS under numpy/scipy.

Why: these machines have two cores that are often both busy. torch honours
``torch.set_num_threads``, but numpy's OpenBLAS keeps its own pool (sized to the core count at
import) and busy-waits; with another process on the second core a 2-thread OpenBLAS call was
measured 5-25x slower than a 1-thread one (exact GHMM sampling of the 192-state EM-SFP: 125 ms vs
25 ms per batch). So a study's ``torch_threads`` parameter must cap both pools, at run time,
whatever environment the kernel was started with. :func:`usable_cores` is how many CPUs this
process may use (what worker pools are sized by).
"""

from __future__ import annotations

import os
import sys

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # pinned in requirements.txt; absent only on bare machines such as the GPU host
    threadpool_limits = None

__all__ = ["limit_threads", "usable_cores"]


def limit_threads(threads: int) -> int:
    """Cap torch's intra-op pool and every BLAS/OpenMP pool of this process to ``threads``.

    Returns the cap, so notebooks can print what they ran with.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    torch = sys.modules.get("torch")  # core stays numpy-only: cap torch's pool only where torch is in use
    if torch is not None:
        torch.set_num_threads(threads)
    if threadpool_limits is not None:
        threadpool_limits(limits=threads)  # process-wide until changed again (not used as a context)
    return threads


def usable_cores() -> int:
    """How many CPUs this process may run on: ``os.process_cpu_count()`` where Python has it (3.13), else its
    affinity mask (``taskset`` and cgroup cpusets count), else the machine's ``os.cpu_count()``; at least 1."""
    count = getattr(os, "process_cpu_count", None)
    if count is not None:
        return max(1, count() or 1)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
