"""Smoke tests of the shared figure helpers (they are used by every report)."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from persona_wm.plots.toy import plot_simplex, plot_transfer_blocks, simplex_xy
from persona_wm.processes import get_process


def test_simplex_vertices_and_centre() -> None:
    xy = simplex_xy(np.vstack([np.eye(3), np.full(3, 1 / 3)]))
    np.testing.assert_allclose(xy[:3], [[0, 0], [1, 0], [0.5, np.sqrt(3) / 2]])
    np.testing.assert_allclose(xy[3], xy[:3].mean(0))
    with pytest.raises(ValueError, match="3 states"):
        simplex_xy(np.ones((2, 4)) / 4)


def test_figures_have_labelled_axes() -> None:
    import matplotlib.pyplot as plt

    fig = plot_transfer_blocks(get_process("pp_z1r_x_pp_z1r"))
    assert len(fig.axes) == 5  # four tokens + colour bar
    assert "sector order" in fig.axes[0].get_xlabel()
    fig2, ax = plt.subplots()
    plot_simplex(np.random.default_rng(0).dirichlet(np.ones(3), 50), ax, hue=np.arange(50) % 3, hue_name="k")
    assert "barycentric" in ax.get_xlabel() and "barycentric" in ax.get_ylabel()
    plt.close("all")
