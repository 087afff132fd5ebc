"""persona_wm.core.threads caps torch and the BLAS pools together (a 2-thread OpenBLAS under load was 5-25x slower)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info

from persona_wm.core.threads import limit_threads


def test_limit_threads_caps_torch_and_blas():
    before = torch.get_num_threads()
    try:
        assert limit_threads(1) == 1
        np.ones((64, 64)) @ np.ones((64, 64))  # make sure numpy's BLAS is loaded and listed
        assert torch.get_num_threads() == 1
        blas = [pool for pool in threadpool_info() if pool["user_api"] == "blas"]
        assert blas and all(pool["num_threads"] == 1 for pool in blas), blas
    finally:
        limit_threads(before)


@pytest.mark.parametrize("bad", [0, -2, 1.5, "2", True])
def test_limit_threads_rejects_non_positive_integers(bad):
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        limit_threads(bad)
