"""The seed's published numbers (appendix A of seed 000), transcribed once so reports can sit beside them.

Tables 2-5: columns are D_KL(p^ || p_target), D_KL(p^_f || p_f^orig) (steered),
D_KL(p^_fbar || p_fbar^orig) (unsteered) and Ratio = unsteered / steered, per steering scale,
averaged over the 6 ordered source -> target pairs. Table 6: forbidden-token and target-class
mass per partition block of the semi-factored process. The seed gives the semi-factored
steering results only in prose (factor 0 spillover 0.34 at scale 1; factor 1 spillover below
0.014 at scale 3), kept in :data:`SEMI_FACTORED_PROSE`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["STEERING", "PARTITION", "SEMI_FACTORED_PROSE", "TABLE1", "TABLE_LABELS", "HEADLINE_RATIO", "steering_table",
           "table_label", "partition_table", "beside_seed", "reading_agreement", "fold_by_reading", "READING_SUFFIX"]

_COLUMNS = ["scale", "kl_target", "kl_steered", "kl_unsteered", "ratio"]
_NAN = float("nan")

#: (process, factor) -> rows of [scale, kl_target, kl_steered, kl_unsteered, ratio]
STEERING: dict[tuple[str, int], list[list[float]]] = {
    ("z1r_x_z1r", 0): [  # Table 2
        [0.00, 3.5202, 0.0000, 0.0000, _NAN], [0.25, 2.3222, 0.0530, 0.0000, 0.0005],
        [0.50, 0.9239, 0.2785, 0.0003, 0.0012], [0.75, 0.3011, 0.7583, 0.0005, 0.0006],
        [1.00, 0.0555, 1.7904, 0.0038, 0.0021], [1.25, 0.0191, 2.6702, 0.0061, 0.0023],
        [1.50, 0.0384, 3.1446, 0.0067, 0.0021], [2.00, 0.1710, 3.8160, 0.0086, 0.0023],
        [3.00, 0.3965, 4.5023, 0.0104, 0.0023],
    ],
    ("z1r_x_z1r", 1): [  # Table 3
        [0.00, 3.5138, 0.0000, 0.0000, _NAN], [0.25, 2.5263, 0.0397, 0.0001, 0.0022],
        [0.50, 1.1264, 0.2197, 0.0006, 0.0027], [0.75, 0.4035, 0.7256, 0.0018, 0.0025],
        [1.00, 0.1020, 1.6297, 0.0038, 0.0023], [1.25, 0.0246, 2.4785, 0.0049, 0.0020],
        [1.50, 0.0422, 2.9935, 0.0060, 0.0020], [2.00, 0.1904, 3.7462, 0.0118, 0.0031],
        [3.00, 0.4350, 4.5261, 0.0205, 0.0045],
    ],
    ("mess3_x_mess3", 0): [  # Table 4
        [0.00, 0.0244, 0.0000, 0.0000, _NAN], [0.25, 0.0143, 0.0014, 0.0000, 0.0099],
        [0.50, 0.0068, 0.0055, 0.0001, 0.0099], [0.75, 0.0021, 0.0124, 0.0001, 0.0099],
        [1.00, 0.0002, 0.0219, 0.0002, 0.0099], [1.25, 0.0011, 0.0340, 0.0003, 0.0100],
        [1.50, 0.0044, 0.0484, 0.0005, 0.0100], [2.00, 0.0177, 0.0825, 0.0008, 0.0102],
        [3.00, 0.0613, 0.1622, 0.0017, 0.0106],
    ],
    ("mess3_x_mess3", 1): [  # Table 5
        [0.00, 0.0246, 0.0000, 0.0000, _NAN], [0.25, 0.0141, 0.0015, 0.0000, 0.0014],
        [0.50, 0.0065, 0.0059, 0.0000, 0.0014], [0.75, 0.0018, 0.0133, 0.0000, 0.0014],
        [1.00, 0.0002, 0.0236, 0.0000, 0.0014], [1.25, 0.0014, 0.0366, 0.0000, 0.0014],
        [1.50, 0.0053, 0.0520, 0.0001, 0.0014], [2.00, 0.0202, 0.0888, 0.0001, 0.0014],
        [3.00, 0.0679, 0.1747, 0.0003, 0.0016],
    ],
}

#: Table 6: scale -> {block: (forbidden, target)}
PARTITION: dict[float, dict[str, tuple[float, float]]] = {
    0.0: {"P10": (0.001, 0.518), "P01": (0.001, 0.516)},
    0.5: {"P10": (0.000, 0.983), "P01": (0.000, 0.986)},
    1.0: {"P10": (0.000, 0.999), "P01": (0.001, 0.999)},
    2.0: {"P10": (0.019, 0.981), "P01": (0.080, 0.920)},
    3.0: {"P10": (0.130, 0.870), "P01": (0.373, 0.627)},
    5.0: {"P10": (0.395, 0.605), "P01": (0.691, 0.309)},
}

#: Semi-factored steering, stated in the seed's prose only.
SEMI_FACTORED_PROSE = {"factor0_spillover_scale_1": 0.34, "factor1_spillover_max_scale_3": 0.014}

#: Table 1 (Z1R x Z1R averaged over both factors): scale -> (kl_target, steered, unsteered)
TABLE1 = {0.5: (1.025, 0.249, 0.001), 1.0: (0.079, 1.710, 0.004), 2.0: (0.181, 3.781, 0.010)}

#: Which seed table holds (process, steered factor).
TABLE_LABELS = {("z1r_x_z1r", 0): "Table 2", ("z1r_x_z1r", 1): "Table 3", ("mess3_x_mess3", 0): "Table 4",
                ("mess3_x_mess3", 1): "Table 5"}

#: The seed's headline spillover ratio at scale 1, both factors (Table 1 for Z1R x Z1R, Tables 4-5 for Mess3 x Mess3).
HEADLINE_RATIO = {"z1r_x_z1r": 0.0022, "mess3_x_mess3": 0.0057}


def steering_table(process: str, factor: int) -> pd.DataFrame | None:
    """The seed's table for (process, factor), or None if the seed reports none."""
    rows = STEERING.get((process, factor))
    return None if rows is None else pd.DataFrame(rows, columns=_COLUMNS)


def table_label(process: str, factor: int) -> str:
    """The seed table of (process, factor), or a note that the seed has none (prose only)."""
    return TABLE_LABELS.get((process, factor), "no seed table (prose only)")


def partition_table() -> pd.DataFrame:
    """Table 6 as a long frame: scale, block, forbidden, target."""
    return pd.DataFrame([{"scale": s, "block": b, "forbidden": f, "target": t}
                         for s, blocks in PARTITION.items() for b, (f, t) in blocks.items()])


#: The two readings of appendix A's context average (persona_wm.toy.steer.steering_sweep): column suffix per reading.
READING_SUFFIX = {"per-context": "", "context-averaged": "_avg"}


def beside_seed(stats: pd.DataFrame, process: str, factor: int, quantity: str = "ratio") -> pd.DataFrame:
    """``seed | per-context | context-averaged | conditional (both readings)`` for one quantity.

    ``stats`` is the across-seeds summary of the steering frame (``<col>_mean`` / ``<col>_sd``
    columns, one row per process, method, factor and scale). Each of ours is "mean ± sd over
    training seeds".
    """
    rows = stats[(stats.process == process) & (stats.factor == factor)]
    seed = steering_table(process, factor)
    table = pd.DataFrame(index=sorted(rows.scale.unique()))
    table.index.name = "scale"
    if seed is not None:
        table["seed"] = seed.set_index("scale")[quantity]
    for method, label in (("centroid", "seed method"), ("conditional", "conditional")):
        ours = rows[rows.method == method].set_index("scale")
        for reading, suffix in READING_SUFFIX.items():
            mean, sd = ours[f"{quantity}{suffix}_mean"], ours[f"{quantity}{suffix}_sd"].fillna(0)
            table[f"{label}, {reading}"] = [f"{m:.4g} ± {s:.2g}" if pd.notna(m) else "–" for m, s in zip(mean, sd)]
    return table


def reading_agreement(stats: pd.DataFrame, quantity: str = "ratio", scales: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0,
                                                                                                      1.25, 1.5, 2.0, 3.0)
                      ) -> pd.DataFrame:
    """How closely each reading of the seed's method reproduces each seed table, scale by scale.

    Per (process, factor, reading): ours / seed at every scale the seed reports (1 = exact), and the
    geometric mean of that factor over scales (``fold`` = exp mean |log(ours / seed)|, 1 = exact;
    seed entries of 0.0000, rounded to nothing, are skipped).
    """

    out = []
    for (process, factor), _ in STEERING.items():
        seed = steering_table(process, factor).set_index("scale")[quantity]
        ours = stats[(stats.process == process) & (stats.factor == factor) & (stats.method == "centroid")]
        if ours.empty:
            continue
        ours = ours.set_index("scale")
        for reading, suffix in READING_SUFFIX.items():
            row = {"process": process, "factor": factor, "reading": reading}
            logs = []
            for c in scales:
                if c not in ours.index or c not in seed.index or not seed[c] > 0:
                    continue
                value = ours.loc[c, f"{quantity}{suffix}_mean"]
                row[f"x{c:g}"] = value / seed[c]
                if value > 0:
                    logs.append(abs(np.log(value / seed[c])))
            row["fold"] = float(np.exp(np.mean(logs))) if logs else float("nan")
            out.append(row)
    return pd.DataFrame(out)


def fold_by_reading(agreement: pd.DataFrame) -> pd.Series:
    """Per (process, reading): the geometric mean over both factors of :func:`reading_agreement`'s ``fold``
    (1 = the reading reproduces the seed's tables exactly)."""
    return agreement.groupby(["process", "reading"]).fold.apply(lambda f: float(np.exp(np.log(f).mean())))
