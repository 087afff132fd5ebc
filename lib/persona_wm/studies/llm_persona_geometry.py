"""Study 05a (LLM persona geometry and steering specificity): the section functions the notebook calls
and the frozen dataclasses its results live in.

Each function computes one section of ``notebooks/05a_llm_persona_geometry.py`` and returns a frozen
dataclass; :class:`PersonaGeometryResult` assembles them and :meth:`PersonaGeometryResult.metrics`
builds the dict ``metrics.json`` is written from. The arithmetic is the notebook's, moved here
unchanged (same calls, same order, same seeds), so ``metrics.json`` is byte-identical to the
notebook-only version's apart from the wall-clock ``timing`` entries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pingouin as pg
import torch
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.analysis import geometry
from persona_wm.analysis.stats import CI_METHODS, CheckedIntervals, checked_bootstrap, holm
from persona_wm.core.values import undefined_as_none
from persona_wm.llm import controls as llm_controls
from persona_wm.llm import steer as llm_steer
from persona_wm.llm.model import (
    LLM,
    Decoding,
    cached,
    cached_generate,
    chat_prompt_ids,
    encode,
    forward,
    load_llm,
    persona_pass,
    scored_sequence,
    time_forward_overhead,
    with_plain_template,
)
from persona_wm.llm.personas import (
    ANCHOR,
    PERSONAS,
    PROMPTS,
    check_personas,
    fine_cluster,
    macro_cluster,
    same_cluster_matrices,
    strata,
)
from persona_wm.llm.steer import SteeringBase

__all__ = [
    "GATE_COLUMNS",
    "SEED_CONFIRM_LAYER",
    "SEED_N_LAYERS",
    "SEED_RHO",
    "SEED_TABLE",
    "STEER_SUMMARY_COLUMNS",
    "Conclusion",
    "PROMPT_SETS",
    "Crossed",
    "HeldoutSteering",
    "LayerPlan",
    "Heatmaps",
    "LayerAnalysis",
    "PersonaGeometryResult",
    "Responses",
    "Setup",
    "Steering",
    "SteeringControls",
    "SteeringHeadline",
    "TeacherForced",
    "Timing",
    "conclude",
    "crossed_design",
    "forward_timing",
    "heldout_steering",
    "layer_plan",
    "heatmaps",
    "layer_analysis",
    "load_setup",
    "models_table",
    "seed_comparison",
    "shared_responses",
    "steering",
    "steering_controls",
    "steering_headline",
    "teacher_force",
]

#: Seed 001's raw rho at its layers (Qwen2.5-7B, 28 blocks; n = 171 pairs).
SEED_RHO: dict[int, float] = {10: 0.663, 15: 0.921, 20: 0.940, 25: 0.898}
SEED_N_LAYERS = 28
#: Seed 001's confirmatory layer (of 28).
SEED_CONFIRM_LAYER = 10
#: Seed 001's other numbers at its layers, from its text ("—" in the comparison where absent).
SEED_TABLE: dict[int, dict[str, Any]] = {
    10: {"mantel_p": 4.9e-4, "stratified_p": 0.160, "partial_rho": 0.601, "radial_residual_rho": 0.451,
         "per_prompt_median_rho": 0.623, "short_ratio": 0.93, "jackknife": "0.630–0.772"},
    15: {"mantel_p": 1e-5, "stratified_p": 0.0417}, 20: {"mantel_p": 1e-5, "stratified_p": 0.0017},
    25: {"mantel_p": 1e-5, "stratified_p": 0.0019}}
GATE_COLUMNS = ["layer", "rho", "mantel_p", "stratified_p", "partial_rho", "radial_residual_rho",
                "per_prompt_median_rho", "short_ratio", "all_gates", "centred_rho", "cos_distance_std"]
#: The summary columns of a steering control table and of ``metrics.json``'s ``by_scale`` rows.
STEER_SUMMARY_COLUMNS = ["intended_shift", "intended_shift_ci_low", "intended_shift_ci_high", "spillover",
                         "spillover_ci_low", "spillover_ci_high", "specificity", "specificity_ci_low",
                         "specificity_ci_high"]
_BY_SCALE_COLUMNS = ["scale", *STEER_SUMMARY_COLUMNS, "capability_accuracy_drop", "steer_magnitude"]


# --------------------------------------------------------------------------------------------
# 1. Setup


@dataclass(frozen=True)
class Setup:
    """The model, the personas (anchor last), the prompts and seed 001's layers at matched depth."""

    llm: LLM
    names: list[str]
    prompts: list[str]
    decoding: Decoding
    depth: pd.DataFrame  # seed_layer, seed_rho, our_layer
    prompt_format: str = "chat"

    @property
    def anchor(self) -> int:
        return len(self.names) - 1

    @property
    def systems(self) -> list[str]:
        return [PERSONAS[n] for n in self.names]

    @property
    def core(self) -> list[int]:
        """Non-anchor personas: the statistics never see the anchor."""
        return list(range(self.anchor))

    @property
    def core_names(self) -> list[str]:
        return self.names[: self.anchor]

    @property
    def n_pairs(self) -> int:
        return len(self.core) * (len(self.core) - 1) // 2

    @property
    def confirm_layer(self) -> int:
        """Our layer at the depth of seed 001's confirmatory L10."""
        return int(self.depth.loc[self.depth["seed_layer"] == SEED_CONFIRM_LAYER, "our_layer"].iloc[0])

    def persona_table(self) -> pd.DataFrame:
        return pd.DataFrame({"cluster": [fine_cluster(n) for n in self.names],
                             "macro": [macro_cluster(n) for n in self.names], "system prompt": self.systems},
                            index=self.names)

    def depth_table(self) -> pd.DataFrame:
        return self.depth.rename(columns={"seed_layer": f"seed 001 layer (of {SEED_N_LAYERS})", "seed_rho": "seed rho",
                                          "our_layer": f"{self.model_label} layer (of {self.n_layers})"})

    @property
    def n_layers(self) -> int:
        return int(self.llm.n_layers) if self.llm is not None else int(self.depth.attrs.get("n_layers", 0))

    @property
    def model_label(self) -> str:
        """The loaded model's name, for labels and tables."""
        return self.llm.name if self.llm is not None else str(self.depth.attrs.get("model", "model"))


def load_setup(personas: Sequence[str], n_prompts: int, max_new_tokens: int, repetition_penalty: float, *,
               model: str | None, device: str, threads: int, prompt_format: str = "chat") -> Setup:
    """Load the model (offline), check the personas and map seed 001's layers to ours by relative depth.

    ``prompt_format="plain"`` renders system + user turns as plain text (:data:`persona_wm.llm.model.PLAIN_TEMPLATE`)
    for a base model without a chat template; ``"chat"`` uses the tokenizer's own template (refused when absent).
    """
    llm = load_llm(model=model, device=device, threads=threads)
    if prompt_format == "plain":
        llm = with_plain_template(llm)
    names = check_personas(list(personas)) + [ANCHOR]
    depth = pd.DataFrame({"seed_layer": list(SEED_RHO), "seed_rho": list(SEED_RHO.values())})
    depth["our_layer"] = [geometry.matched_layer(L, SEED_N_LAYERS, llm.n_layers) for L in depth["seed_layer"]]
    return Setup(llm=llm, names=names, prompts=list(PROMPTS[:n_prompts]),
                 decoding=Decoding(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty), depth=depth,
                 prompt_format=prompt_format)


@dataclass(frozen=True)
class LayerPlan:
    """The layer parameters (relative depths) resolved against the loaded model's depth."""

    n_layers: int
    relative: list[float] | None  # the ``layers`` parameter; None = every layer
    layers: list[int]
    steer_relative: float
    steer_layer: int
    block_relative: tuple[float, float]
    block_layers: list[int]

    def as_dict(self) -> dict[str, Any]:
        return {"layers": self.relative, "resolved_layers": self.layers,
                "steer_layer": {"relative": self.steer_relative, "layer": self.steer_layer},
                "block": {"relative": list(self.block_relative), "layers": self.block_layers}}


def layer_plan(n_layers: int, layers: Sequence[float] | None, steer_layer: float, block_start: float,
               block_end: float) -> LayerPlan:
    """Resolve relative depths (fractions of ``n_layers``; layer = round(f * n_layers), at least 1) and the
    pre-registered block: the measured layers l with ``block_start <= l / n_layers <= block_end``.

    Raises ValueError naming the parameter when a fraction is outside (0, 1] or the block holds no measured layer.
    """
    for name, values in (("layers", layers or []), ("steer_layer", [steer_layer]), ("block_start", [block_start]),
                         ("block_end", [block_end])):
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"{name}: relative depth {bad[0]!r} is outside (0, 1] (fractions of the model's "
                             f"{n_layers} layers)")
    if block_end < block_start:
        raise ValueError(f"block_end: {block_end} is below block_start {block_start}")
    resolved = geometry.relative_layers(None if layers is None else list(layers), n_layers)
    block = [layer for layer in resolved if block_start - 1e-9 <= layer / n_layers <= block_end + 1e-9]
    if not block:
        raise ValueError(f"block_start, block_end: no measured layer lies at relative depth {block_start}-{block_end} "
                         f"of {n_layers} layers (measured: {resolved})")
    return LayerPlan(n_layers, None if layers is None else [float(v) for v in layers], resolved, float(steer_layer),
                     geometry.relative_layers([steer_layer], n_layers)[0], (float(block_start), float(block_end)), block)


@dataclass(frozen=True)
class Responses:
    """One greedy no_persona response per prompt (token ids, end-of-turn included)."""

    ids: list[list[int]]

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(r) for r in self.ids])


def shared_responses(setup: Setup) -> Responses:
    """The shared responses: greedy under the empty system turn, cached on disk."""
    responses, _ = cached_generate(setup.llm, [chat_prompt_ids(setup.llm, "", u) for u in setup.prompts],
                                   setup.decoding)
    return Responses(responses)


# --------------------------------------------------------------------------------------------
# Teacher forcing under every persona


@dataclass(frozen=True)
class TeacherForced:
    """Centroids and JS of one teacher-forced pass per prompt (anchor included), and the passes."""

    passes: list[dict[str, torch.Tensor]]
    centroids: np.ndarray  # [P, n_layers, d], mean over prompts
    js_all: np.ndarray  # [P, P]
    js_short_all: np.ndarray  # [P, P]
    js_prompt_all: np.ndarray  # [n_prompts, P, P]
    core: list[int]
    vector_prompts: list[int]
    eval_prompts: list[int]
    eval_items: list[tuple[str, list[int]]]  # (user prompt, shared response) of each evaluation prompt

    @property
    def js(self) -> np.ndarray:
        return self.js_all[np.ix_(self.core, self.core)]

    @property
    def js_short(self) -> np.ndarray:
        return self.js_short_all[np.ix_(self.core, self.core)]

    @property
    def js_per_prompt(self) -> np.ndarray:
        return self.js_prompt_all[:, self.core][:, :, self.core]

    @property
    def js_pairs(self) -> np.ndarray:
        """JS over the non-anchor pairs (upper triangle)."""
        return geometry.upper(self.js)


def teacher_force(setup: Setup, responses: Responses, short_tokens: int, n_vector_prompts: int, steer_layer: int,
                  steer_tokens: int) -> TeacherForced:
    """Teacher-force each shared response under every system prompt (cached): centroids at every layer,
    JS over the full response and its first ``short_tokens`` positions; on the held-out (evaluation)
    prompts the anchor's residual at ``steer_layer`` over the first ``steer_tokens`` positions, from
    which steering restarts."""
    n_prompts = len(setup.prompts)
    eval_prompts = list(range(n_vector_prompts, n_prompts))
    passes = [persona_pass(setup.llm, setup.systems, setup.prompts[i], responses.ids[i], short_tokens=short_tokens,
                           anchor=setup.anchor if i in eval_prompts else None, anchor_layers=[steer_layer],
                           anchor_tokens=steer_tokens)
              for i in tqdm(range(n_prompts), desc="persona passes")]
    return TeacherForced(
        passes=passes,
        centroids=torch.stack([p["means"] for p in passes]).mean(0).numpy(),
        js_all=torch.stack([p["js"] for p in passes]).mean(0).numpy(),
        js_short_all=torch.stack([p["js_short"] for p in passes]).mean(0).numpy(),
        js_prompt_all=torch.stack([p["js"] for p in passes]).numpy(),
        core=setup.core, vector_prompts=list(range(n_vector_prompts)), eval_prompts=eval_prompts,
        eval_items=[(setup.prompts[i], responses.ids[i]) for i in eval_prompts])


# --------------------------------------------------------------------------------------------
# 2. Representation vs behaviour by layer


@dataclass(frozen=True)
class LayerAnalysis:
    """Seed 001's statistics and gates at every layer (``geometry.layer_statistics``)."""

    stats: pd.DataFrame
    detail: dict[int, dict[str, np.ndarray]]
    n_permutations: int

    @property
    def best(self) -> pd.Series:
        return self.stats.loc[self.stats["rho"].idxmax()]

    @property
    def best_layer(self) -> int:
        return int(self.best["layer"])

    @property
    def passing(self) -> pd.Series:
        """Layers where all six gates pass."""
        return self.stats.loc[self.stats["all_gates"], "layer"]

    @property
    def first_pass(self) -> int | None:
        return int(self.passing.min()) if len(self.passing) else None

    @property
    def jump(self) -> pd.Series:
        """Change of rho into each layer from the previous measured one."""
        return self.stats.set_index("layer")["rho"].diff()

    @property
    def jump_layer(self) -> int:
        return int(self.jump.idxmax()) if len(self.stats) > 1 else self.best_layer

    def at(self, layer: int) -> pd.Series | None:
        """The statistics row of ``layer``, or None where it was not measured."""
        return self.stats.set_index("layer").loc[layer] if layer in set(self.stats["layer"]) else None

    def gate_table(self) -> pd.DataFrame:
        return self.stats[GATE_COLUMNS].round(4).set_index("layer").T


def layer_analysis(setup: Setup, forced: TeacherForced, layers: Sequence[int], n_permutations: int,
                   seed: int) -> LayerAnalysis:
    """Spearman rho, Mantel and within-cluster p, partial, radial-residual, per-prompt and T = 8 rho, the
    jackknife and the gates, at every layer of ``layers``."""
    same_fine, same_macro = same_cluster_matrices(setup.core_names)
    stats, detail = geometry.layer_statistics(forced.centroids[setup.core], layers, forced.js, forced.js_short,
                                              forced.js_per_prompt, strata(setup.core_names), same_fine, same_macro,
                                              n_permutations, seed=seed)
    return LayerAnalysis(stats, detail, n_permutations)


def _fmt(value: Any, spec: str = ".3f") -> str:
    return "—" if value is None else format(value, spec)


def seed_comparison(analysis: LayerAnalysis, depth: pd.DataFrame) -> pd.DataFrame:
    """Our statistics beside seed 001's at the layers of matched relative depth (one column per layer)."""
    rows = []
    for seed_layer, seed_rho, our_layer in depth[["seed_layer", "seed_rho", "our_layer"]].itertuples(index=False):
        d = {"seed_layer": int(seed_layer), "seed_rho": seed_rho, "our_layer": int(our_layer)}
        ours = analysis.at(d["our_layer"])
        s = SEED_TABLE[d["seed_layer"]]
        own = {} if ours is None else ours.to_dict()
        rows.append({
            "seed layer → ours": f"L{d['seed_layer']} → L{d['our_layer']}",
            "ρ seed": _fmt(d["seed_rho"]), "ρ ours": _fmt(own.get("rho")),
            "Mantel p seed": ("<" if d["seed_layer"] > SEED_CONFIRM_LAYER else "") + _fmt(s.get("mantel_p"), ".2g"),
            "Mantel p ours": _fmt(own.get("mantel_p"), ".2g"),
            "within-cluster p seed": _fmt(s.get("stratified_p"), ".3g"),
            "within-cluster p ours": _fmt(own.get("stratified_p"), ".3g"),
            "partial ρ seed": _fmt(s.get("partial_rho")), "partial ρ ours": _fmt(own.get("partial_rho")),
            "radial ρ seed": _fmt(s.get("radial_residual_rho")), "radial ρ ours": _fmt(own.get("radial_residual_rho")),
            "per-prompt median seed": _fmt(s.get("per_prompt_median_rho")),
            "per-prompt median ours": _fmt(own.get("per_prompt_median_rho")),
            "T=8 ratio seed": _fmt(s.get("short_ratio"), ".2f"), "T=8 ratio ours": _fmt(own.get("short_ratio"), ".2f"),
            "jackknife seed": s.get("jackknife", "—"),
            "jackknife ours": "—" if ours is None else f"{ours['jackknife_min']:.3f}–{ours['jackknife_max']:.3f}",
        })
    return pd.DataFrame(rows).set_index("seed layer → ours").T


# --------------------------------------------------------------------------------------------
# 3. The two geometries


@dataclass(frozen=True)
class Heatmaps:
    """Cosine and JS matrices in one clustered persona order, and the most decoupled pairs."""

    order: np.ndarray
    matrices: dict[str, np.ndarray]
    decoupled: pd.DataFrame


def heatmaps(setup: Setup, forced: TeacherForced, analysis: LayerAnalysis) -> Heatmaps:
    """Cosine distance at seed 001's confirmatory depth and at our best layer, and JS, ordered by
    average-linkage clustering of the best layer's cosine distances."""
    best_layer = analysis.best_layer
    heat_layers = [layer for layer in dict.fromkeys([setup.confirm_layer, best_layer]) if layer in analysis.detail]
    order = geometry.cluster_order(analysis.detail[best_layer]["cos"])
    matrices = {f"1 − cos, layer {layer}": analysis.detail[layer]["cos"] for layer in heat_layers}
    matrices["JS divergence (nats), full response"] = forced.js
    decoupled = geometry.decoupled_pairs(analysis.detail[best_layer]["cos"], forced.js, setup.core_names,
                                         k=min(5, setup.n_pairs))
    return Heatmaps(order, matrices, decoupled)


# --------------------------------------------------------------------------------------------
# 3b. Controls


#: The prompt sets of the crossed design, personas first.
PROMPT_SETS: tuple[str, ...] = ("persona", *llm_controls.CONTROL_SETS)
#: Names of the prompt sets in tables and figures.
PROMPT_SET_LABELS = {"persona": "persona", "formatting": "length-matched formatting", "topic": "topic-matched non-persona"}


@dataclass(frozen=True)
class Crossed:
    """The crossed design: weights (trained, each random mode) x prompt set (persona, formatting, topic), RSA rho
    by layer in every cell, and the contrasts built from them, all with two-way bootstrap intervals.

    ``series`` names the entries of ``intervals`` (each a slice of it): ``cell:<weights>/<prompts>`` and
    ``system_tokens`` per layer, ``did`` (the headline: (trained - random) x (persona - control), averaged over
    the random modes and control sets), ``did:<mode>/<set>`` (each component), ``persona_minus_control`` and
    ``trained_minus_random`` per layer, and the block means ``did_block`` and ``did_block:<mode>/<set>``.
    """

    control_ids: list[int]
    systems: dict[str, list[str]]  # prompt set -> its 19 system prompts (index-matched)
    random_modes: list[str]
    layers: list[int]
    block_layers: list[int]
    n_boot: int
    series: dict[str, slice]
    intervals: CheckedIntervals

    @property
    def weights(self) -> list[str]:
        return ["trained", *self.random_modes]

    def get(self, name: str) -> dict[str, np.ndarray]:
        """Estimate and interval of one named series (arrays; one entry per layer, or one for a block mean)."""
        k = self.series[name]
        iv = self.intervals
        return {"estimate": iv.estimate[k], "ci_low": iv.low[k], "ci_high": iv.high[k], "ci_method": iv.method[k]}

    def did_p(self) -> np.ndarray:
        """Bootstrap p of the headline DiD at each layer (before correction)."""
        return self.intervals.p_values()[self.series["did"]]

    def holm(self) -> tuple[np.ndarray, np.ndarray]:
        """Holm-adjusted p values of the per-layer DiD across the measured layers, and which reject at 0.05."""
        return holm(self.did_p())

    def block(self) -> dict[str, Any]:
        b = self.get("did_block")
        return {"estimate": float(b["estimate"][0]), "ci_low": float(b["ci_low"][0]), "ci_high": float(b["ci_high"][0]),
                "ci_method": CI_METHODS[int(b["ci_method"][0])], "block": self.block_layers}

    def cells_frame(self) -> pd.DataFrame:
        """Long frame: layer, weights, prompt set, rho and its interval (system-token centroids as one more line)."""
        rows = []
        for w in self.weights:
            for ps in PROMPT_SETS:
                d = self.get(f"cell:{w}/{ps}")
                rows.append(pd.DataFrame({"layer": self.layers, "weights": w, "prompts": PROMPT_SET_LABELS[ps],
                                          "rho": d["estimate"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}))
        d = self.get("system_tokens")
        rows.append(pd.DataFrame({"layer": self.layers, "weights": "trained", "prompts": "persona, system-token centroids",
                                  "rho": d["estimate"], "ci_low": d["ci_low"], "ci_high": d["ci_high"]}))
        return pd.concat(rows, ignore_index=True)

    def did_frame(self) -> pd.DataFrame:
        """Per layer: the headline DiD with its interval, raw and Holm p, in-block flag, and each component."""
        d = self.get("did")
        adjusted, reject = self.holm()
        frame = pd.DataFrame({"layer": self.layers, "did": d["estimate"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                              "p": self.did_p(), "holm_p": adjusted, "holm_reject": reject,
                              "in_block": [layer in self.block_layers for layer in self.layers]})
        for mode in self.random_modes:
            for cs in llm_controls.CONTROL_SETS:
                frame[f"{mode} x {cs}"] = self.get(f"did:{mode}/{cs}")["estimate"]
        return frame

    def cell_table(self) -> pd.DataFrame:
        """Rho per layer (rows) and cell (columns), point values."""
        frame = self.cells_frame()
        frame["cell"] = frame["weights"] + " · " + frame["prompts"]
        return frame.pivot(index="layer", columns="cell", values="rho")[list(dict.fromkeys(frame["cell"]))]

    def length_table(self, setup: Setup, n: int = 3) -> pd.DataFrame:
        """The first ``n`` control prompts of each set with their token counts beside their persona prompt's."""
        llm = setup.llm
        return pd.DataFrame([{"persona": setup.core_names[k], "persona prompt tokens": len(encode(llm, setup.systems[k])),
                              **{f"{cs} prompt": self.systems[cs][k] for cs in llm_controls.CONTROL_SETS},
                              **{f"{cs} tokens": len(encode(llm, self.systems[cs][k])) for cs in llm_controls.CONTROL_SETS}}
                             for k in range(min(n, len(setup.core_names)))])

    def lengths_match(self, setup: Setup) -> bool:
        """Every control prompt of both sets has its persona prompt's token count."""
        return all(len(encode(setup.llm, c)) == len(encode(setup.llm, s))
                   for cs in llm_controls.CONTROL_SETS for c, s in zip(self.systems[cs], setup.systems[: setup.anchor]))

    def ci_methods(self) -> dict[str, int]:
        return self.intervals.counts()

    @property
    def block_excludes_zero(self) -> bool:
        """The block-mean DiD's interval lies wholly above or below 0."""
        b = self.block()
        return bool(b["ci_low"] > 0 or b["ci_high"] < 0)

    @property
    def holm_layers(self) -> list[int]:
        """Layers whose per-layer DiD survives Holm's correction at 0.05."""
        return [layer for layer, r in zip(self.layers, self.holm()[1]) if r]

    @property
    def verdict(self) -> str:
        """One phrase on the headline: is there a persona-specific residue in the pre-registered block?"""
        b = self.block()
        if b["ci_low"] > 0:
            return "a persona-specific residue: the trained model's persona-over-control advantage exceeds the random models'"
        if b["ci_high"] < 0:
            return "the opposite of a persona-specific residue: the random models gain more from persona prompts"
        return "no persona-specific residue that the two-way bootstrap can distinguish from zero"


def _contrasts(weights: list[str], layers: list[int], block_layers: list[int]) -> tuple[np.ndarray, dict[str, slice]]:
    """The linear map from cell rho ([cells + system tokens] x layers, flattened) to every reported series."""
    n_l = len(layers)
    cells = [f"cell:{w}/{ps}" for w in weights for ps in PROMPT_SETS] + ["system_tokens"]
    col = {name: i * n_l for i, name in enumerate(cells)}
    n_in = len(cells) * n_l
    rows: list[np.ndarray] = []
    series: dict[str, slice] = {}

    def add(name: str, block: np.ndarray) -> None:
        series[name] = slice(sum(len(r) for r in rows), sum(len(r) for r in rows) + len(block))
        rows.append(block)

    def cell(w: str, ps: str) -> np.ndarray:
        m = np.zeros((n_l, n_in))
        m[np.arange(n_l), col[f"cell:{w}/{ps}"] + np.arange(n_l)] = 1.0
        return m

    for name in cells:
        m = np.zeros((n_l, n_in))
        m[np.arange(n_l), col[name] + np.arange(n_l)] = 1.0
        add(name, m)
    randoms, sets = weights[1:], list(llm_controls.CONTROL_SETS)
    parts = {(r, c): cell("trained", "persona") - cell(r, "persona") - cell("trained", c) + cell(r, c)
             for r in randoms for c in sets}
    did = sum(parts.values()) / len(parts)
    add("did", did)
    for (r, c), m in parts.items():
        add(f"did:{r}/{c}", m)
    add("persona_minus_control", cell("trained", "persona") - sum(cell("trained", c) for c in sets) / len(sets))
    add("trained_minus_random", cell("trained", "persona") - sum(cell(r, "persona") for r in randoms) / len(randoms))
    in_block = np.array([layer in block_layers for layer in layers], dtype=float) / len(block_layers)
    add("did_block", (in_block @ did)[None])
    for (r, c), m in parts.items():
        add(f"did_block:{r}/{c}", (in_block @ m)[None])
    return np.vstack(rows), series


def _cell_arrays(passes: Sequence[dict[str, torch.Tensor]], layer_index: list[int], rows: list[int] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt centroids [U, P, L, d] at ``layer_index`` and JS [U, P, P] of a list of persona passes."""
    pick = slice(None) if rows is None else rows
    means = np.stack([p["means"][pick][:, layer_index].numpy() for p in passes])
    js = np.stack([p["js"].numpy()[np.ix_(rows, rows)] if rows is not None else p["js"].numpy() for p in passes])
    return means, js


def crossed_design(setup: Setup, responses: Responses, forced: TeacherForced, plan: LayerPlan, n_control_prompts: int,
                   random_modes: Sequence[str], short_tokens: int, n_boot: int, seed: int) -> Crossed:
    """Run every cell of weights x prompt set through the persona pipeline on the first ``n_control_prompts``
    prompts, and bootstrap rho, the difference-in-differences and its block mean over user prompts AND system
    prompts (drawn independently; system prompt k of every set is resampled together)."""
    llm, anchor, prompts, systems = setup.llm, setup.anchor, setup.prompts, setup.systems
    layers = plan.layers
    layer_index = [layer - 1 for layer in layers]
    control_ids = list(range(min(n_control_prompts, len(prompts))))
    enc = lambda text: encode(llm, text)  # noqa: E731
    sets = {"persona": systems[:anchor],
            "formatting": llm_controls.length_matched_controls(enc, systems[:anchor]),
            "topic": llm_controls.topic_matched_controls(enc, setup.core_names, systems[:anchor])}

    def passes(model: LLM, ps: str, desc: str) -> list[dict[str, torch.Tensor]]:
        return [persona_pass(model, sets[ps], prompts[i], responses.ids[i], short_tokens=short_tokens)
                for i in tqdm(control_ids, desc=desc)]

    cells = {("trained", "persona"): _cell_arrays([forced.passes[i] for i in control_ids], layer_index, setup.core)}
    for ps in llm_controls.CONTROL_SETS:
        cells[("trained", ps)] = _cell_arrays(passes(llm, ps, f"trained x {ps}"), layer_index)
    for mode in random_modes:
        random_llm = llm_controls.random_weights_llm(llm, seed, mode)
        for ps in PROMPT_SETS:
            cells[(mode, ps)] = _cell_arrays(passes(random_llm, ps, f"{mode} x {ps}"), layer_index)
        del random_llm
    weights = ["trained", *random_modes]
    system_means = llm_controls.system_token_means(llm, systems[:anchor], prompts[0], layers).numpy()
    persona_js = cells[("trained", "persona")][1]
    grams = [geometry.PromptGram.of(*cells[(w, ps)]) for w in weights for ps in PROMPT_SETS]
    grams.append(geometry.PromptGram.of(np.repeat(system_means[None], len(control_ids), 0), persona_js))
    matrix, series = _contrasts(weights, list(layers), plan.block_layers)

    def statistic(users: np.ndarray, picked: np.ndarray) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return matrix @ geometry.crossed_rsa(grams, users, picked).reshape(-1)

    intervals = checked_bootstrap((np.arange(len(control_ids)), np.arange(anchor)), statistic, n_boot, seed)
    return Crossed(control_ids, {k: list(v) for k, v in sets.items()}, list(random_modes), list(layers),
                   list(plan.block_layers), n_boot, series, intervals)


# --------------------------------------------------------------------------------------------
# 4. Steering specificity


@dataclass(frozen=True)
class Steering:
    """Centroid and persona vectors at ``layer`` and their sweep over target personas and scales."""

    layer: int
    vectors: dict[str, torch.Tensor]
    cosines: np.ndarray
    n_items: int
    base: SteeringBase
    targets: llm_steer.PersonaTargets
    sweep: pd.DataFrame
    summary: pd.DataFrame

    @property
    def centroid(self) -> torch.Tensor:
        return self.vectors["centroid"]


def steering(setup: Setup, forced: TeacherForced, layer: int, vector_max_new_tokens: int, repetition_penalty: float,
             scales: Sequence[float], n_capability: int, steer_tokens: int, seed: int) -> Steering:
    """Build both vectors on the vector prompts, steer the no_persona run towards every persona at every
    scale, and score intended shift, spillover and specificity on the held-out prompts."""
    llm, anchor = setup.llm, setup.anchor
    passes = forced.passes
    vec_centroids = torch.stack([p["means"][:, layer - 1] for p in passes[:len(forced.vector_prompts)]]).mean(0)
    centroid_vec = llm_steer.centroid_vectors(vec_centroids, anchor)[:anchor]
    own_means = llm_steer.persona_vector_means(llm, setup.systems[:anchor], [setup.prompts[i] for i in forced.vector_prompts],
                                               Decoding(vector_max_new_tokens, repetition_penalty), layer)
    persona_vec = llm_steer.match_norms(llm_steer.diff_in_means(own_means, vec_centroids[anchor]), centroid_vec)
    vectors = {"centroid": centroid_vec, "persona_vector": persona_vec}
    cosines = torch.nn.functional.cosine_similarity(centroid_vec, persona_vec, dim=-1).numpy()
    items = llm_steer.capability_items(n_capability)
    eval_passes = [passes[i] for i in forced.eval_prompts]
    base = llm_steer.steering_base(llm, layer, eval_passes, steer_tokens, items)
    targets = llm_steer.persona_targets(llm, setup.systems, forced.eval_items, setup.core, steer_tokens)
    sweep = llm_steer.llm_steering_sweep(llm, base, vectors, setup.core_names, scales, targets)
    summary = llm_steer.summarise_llm_sweep(sweep, seed=seed)
    return Steering(layer, vectors, cosines, len(items), base, targets, sweep, summary)


@dataclass(frozen=True)
class SteeringControls:
    """A random direction at the centroid norm, and both methods compared at matched intended shift."""

    random_summary: pd.DataFrame
    matched_sweep: pd.DataFrame
    reachable: list[int]
    matched: pd.DataFrame
    matched_summary: pd.DataFrame  # indexed by method
    rounds: int

    @property
    def random(self) -> pd.Series:
        return self.random_summary.set_index("method").loc["random"]

    def table(self) -> pd.DataFrame:
        both = pd.concat([self.random_summary.set_index("method"), self.matched_summary.add_suffix("")])
        return both[STEER_SUMMARY_COLUMNS].round(4)

    @property
    def matched_p(self) -> float | None:
        """Paired Wilcoxon over personas on spillover at matched effect (None below 5 personas)."""
        paired = self.matched.pivot(index="persona", columns="method", values="spillover").dropna()
        return (float(pg.wilcoxon(paired["centroid"], paired["persona_vector"])["p_val"].iloc[0])
                if len(paired) >= 5 else None)


def steering_controls(setup: Setup, steer: Steering, headline_scale: float, rounds: int, seed: int) -> SteeringControls:
    """The random-direction control at the headline scale, and the centroid vector rescaled per persona to
    the persona vector's intended shift (interpolated from the sweep, ``rounds`` secant refinements)."""
    llm, names, targets, sweep = setup.llm, setup.core_names, steer.targets, steer.sweep
    control_vectors = {"random": llm_controls.random_directions(steer.centroid.norm(dim=-1), llm.d_model, seed)}
    random_sweep = llm_steer.llm_steering_sweep(llm, steer.base, control_vectors, names, [headline_scale], targets)
    random_summary = llm_steer.summarise_llm_sweep(random_sweep, seed=seed)
    at_head = sweep[(sweep.method == "persona_vector") & (sweep.scale == headline_scale)]
    goal = at_head.set_index("persona")["intended_shift"]
    matched_sweep, reachable = llm_controls.matched_effect_sweep(llm, steer.base, steer.centroid, names, sweep,
                                                                goal.to_dict(), targets, "centroid", rounds=rounds)
    matched = pd.concat([at_head[at_head.persona.isin(matched_sweep.persona)], matched_sweep])
    matched_summary = llm_steer.summarise_llm_sweep(matched.assign(scale=1.0), seed=seed).set_index("method")
    return SteeringControls(random_summary, matched_sweep, reachable, matched, matched_summary, rounds)


#: Matched intended shift: the rescaled vector's shift within this fraction of its target, per persona.
MATCH_TOLERANCE = 0.25


@dataclass(frozen=True)
class HeldoutSteering:
    """Both vectors built on tokens the metric never scores, compared at matched intended shift.

    The metric scores the held-out prompts' *shared* (no_persona) responses teacher-forced under each persona.
    Here both vectors come from each persona's *own* greedy responses to the vector prompts: the centroid
    vector = residual under X's system prompt minus residual under the empty system prompt **on the same tokens**
    (X's responses); the persona vector = the same X mean minus the empty system prompt's mean over **its own**
    responses (the persona-vector recipe), rescaled to the centroid vector's norm. The centroid vector is then
    rescaled per persona to the persona vector's intended shift (``rounds`` secant steps), and the two are
    compared on spillover at that matched shift: ``difference`` = centroid - persona vector, mean over personas
    with a bootstrap interval over personas (BCa, percentile fallback) and a paired Wilcoxon p.
    """

    vectors: dict[str, torch.Tensor]
    sweep: pd.DataFrame  # both vectors at the headline scale
    matched: pd.DataFrame  # per persona: persona vector at the headline scale + the rescaled centroid vector
    reachable: list[str]  # personas compared: the centroid vector reached the persona vector's shift
    unmatched: list[str]  # personas with a positive persona-vector shift that the centroid vector did not reach
    difference: CheckedIntervals | None
    wilcoxon_p: float | None

    def per_persona(self) -> pd.DataFrame:
        """Intended shift and spillover of both methods at matched shift, one row per reachable persona."""
        return self.matched.pivot(index="persona", columns="method", values=["intended_shift", "spillover"])

    def summary(self) -> dict[str, Any]:
        table = self.per_persona()
        if not len(table):
            return {"centroid": None, "persona_vector": None, "difference": None, "ci": [None, None],
                    "n_personas": 0, "unmatched": self.unmatched}
        d = self.difference
        return {"centroid": float(table[("spillover", "centroid")].mean()),
                "persona_vector": float(table[("spillover", "persona_vector")].mean()),
                "difference": None if d is None else float(d.estimate[0]),
                "ci": [None, None] if d is None else [float(d.low[0]), float(d.high[0])],
                "ci_method": None if d is None else CI_METHODS[int(d.method[0])],
                "measure": "spillover (JS on capability answers, nats) at matched intended shift, mean over personas",
                "intended_shift": {m: float(table[("intended_shift", m)].mean()) for m in llm_steer.METHODS},
                "match_tolerance": MATCH_TOLERANCE, "unmatched": self.unmatched,
                "n_personas": len(table), "wilcoxon_p": self.wilcoxon_p,
                "vector_cosine_median": float(np.median(torch.nn.functional.cosine_similarity(
                    self.vectors["centroid"], self.vectors["persona_vector"], dim=-1).numpy()))}


def _own_response_means(setup: Setup, forced: TeacherForced, responses: Responses, layer: int, decoding: Decoding
                        ) -> dict[str, torch.Tensor]:
    """[P, d] means at ``layer`` over each persona's own responses to the vector prompts: under its own system
    prompt (``own``), under the empty one (``empty_on_own``), and the empty prompt over its own (shared)
    responses cut to the same length (``empty_own``); cached."""
    llm, anchor = setup.llm, setup.anchor
    per_prompt: dict[str, list[torch.Tensor]] = {"own": [], "empty_on_own": [], "empty_own": []}
    for i in forced.vector_prompts:
        user = setup.prompts[i]
        own, _ = cached_generate(llm, [chat_prompt_ids(llm, sys, user) for sys in setup.systems[:anchor]], decoding,
                                 capture_layer=layer)
        empty = chat_prompt_ids(llm, "", user)
        seqs = {"own": [scored_sequence(chat_prompt_ids(llm, sys, user), r) for sys, r in zip(setup.systems[:anchor], own)],
                "empty_on_own": [scored_sequence(empty, r) for r in own],
                "empty_own": [scored_sequence(empty, responses.ids[i][:decoding.max_new_tokens])]}
        key = {"layer": layer, **{k: [[list(q.ids), q.start] for q in v] for k, v in seqs.items()}}

        def compute(seqs=seqs) -> dict[str, torch.Tensor]:
            return {k: forward(llm, v, layers=[layer], logprobs=False).scored_mean(layer, v) for k, v in seqs.items()}

        out = cached(llm, "own_response_means", key, compute)
        for k in per_prompt:
            per_prompt[k].append(out[k])
    return {k: torch.stack(v).mean(0) for k, v in per_prompt.items()}


def heldout_steering(setup: Setup, forced: TeacherForced, responses: Responses, steer: Steering,
                     vector_max_new_tokens: int, repetition_penalty: float, headline_scale: float, rounds: int,
                     n_boot: int, seed: int) -> HeldoutSteering:
    """Section 4b: centroid vs persona vector, both built on the personas' own responses (never scored), at
    matched intended shift."""
    llm, names, layer = setup.llm, setup.core_names, steer.layer
    means = _own_response_means(setup, forced, responses, layer, Decoding(vector_max_new_tokens, repetition_penalty))
    centroid = means["own"] - means["empty_on_own"]
    persona_vec = llm_steer.match_norms(means["own"] - means["empty_own"][0], centroid)
    vectors = {"centroid": centroid, "persona_vector": persona_vec}
    sweep = llm_steer.llm_steering_sweep(llm, steer.base, vectors, names, [headline_scale], steer.targets)
    pv = sweep[sweep.method == "persona_vector"]
    goal = pv[pv.intended_shift > 0].set_index("persona")["intended_shift"]
    targeted = [k for k, name in enumerate(names) if name in goal.index]  # a positive persona-vector shift to match
    named = [names[k] for k in targeted]
    matched_rows, reachable = llm_controls.matched_effect_sweep(
        llm, steer.base, centroid[targeted], named, sweep[sweep.persona.isin(named)], goal.to_dict(),
        llm_steer.select_targets(steer.targets, targeted), "centroid", rounds=rounds)
    # a persona counts only where the rescaled centroid vector reached the persona vector's shift within 25%
    # (secant steps can overshoot to a scale where the shift collapses); the others are reported, not compared
    reached_shift = matched_rows.set_index("persona")["intended_shift"] if len(matched_rows) else pd.Series(dtype=float)
    candidates = [named[k] for k in reachable]
    reached = [p for p in candidates if abs(reached_shift[p] - goal[p]) <= MATCH_TOLERANCE * goal[p]]
    matched = pd.concat([pv[pv.persona.isin(reached)], matched_rows[matched_rows.persona.isin(reached)]])
    table = matched.pivot(index="persona", columns="method", values="spillover").dropna()
    difference, wilcoxon_p = None, None
    if len(table) >= 2:
        diff = (table["centroid"] - table["persona_vector"]).to_numpy()
        difference = checked_bootstrap((diff,), np.mean, n_boot, seed)
    if len(table) >= 5:
        wilcoxon_p = float(pg.wilcoxon(table["centroid"], table["persona_vector"])["p_val"].iloc[0])
    unmatched = [p for p in goal.index if p not in reached]
    return HeldoutSteering(vectors, sweep, matched, reached, unmatched, difference, wilcoxon_p)


@dataclass(frozen=True)
class SteeringHeadline:
    """Both methods at the headline scale: means with CIs, the gap closed, and the paired test."""

    scale: float
    head: pd.DataFrame  # summary rows at the headline scale, indexed by method
    at_head: pd.DataFrame  # specificity per persona (rows) and method (columns)
    paired_p: float | None
    base_acc: float

    @property
    def gap_closed(self) -> dict[str, float]:
        """Share of the unsteered JS gap to the genuine persona output that steering closes."""
        return {m: float(self.head.loc[m, "intended_shift"] / self.head.loc[m, "js_unsteered_target"])
                for m in llm_steer.METHODS}

    @property
    def wins(self) -> int:
        return int((self.at_head["centroid"] > self.at_head["persona_vector"]).sum())


def steering_headline(steer: Steering, headline_scale: float) -> SteeringHeadline:
    """Headline-scale rows and a two-sided Wilcoxon signed-rank test of specificity over personas."""
    head = steer.summary[steer.summary["scale"] == headline_scale].set_index("method")
    sweep = steer.sweep
    at_head = sweep[sweep["scale"] == headline_scale].pivot(index="persona", columns="method", values="specificity")
    if len(at_head) >= 2 and at_head.notna().all().all():
        paired = pg.wilcoxon(at_head["centroid"], at_head["persona_vector"], alternative="two-sided")
        paired_p = float(paired["p_val"].iloc[0])
    else:
        paired_p = None
    return SteeringHeadline(headline_scale, head, at_head, paired_p, float(sweep["capability_accuracy_base"].iloc[0]))


# --------------------------------------------------------------------------------------------
# 5. Cost


@dataclass(frozen=True)
class Timing:
    """Wall-clock cost of our hooked forward against a bare transformers forward (median of repeats)."""

    bare_s: float
    hooked_s: float
    unhooked_s: float
    ratio: float
    hook_ratio: float
    n_tokens: int
    n_seqs: int
    threads: int


def forward_timing(setup: Setup, responses: Responses, repeats: int) -> Timing:
    """The first prompt's shared response under the first four system prompts, every layer read."""
    llm = setup.llm
    seqs = [scored_sequence(chat_prompt_ids(llm, s, setup.prompts[0]), responses.ids[0]) for s in setup.systems[:4]]
    t = time_forward_overhead(llm, seqs, list(range(1, llm.n_layers + 1)), repeats=repeats)
    return Timing(t["bare_s"], t["hooked_s"], t["unhooked_s"], t["ratio"], t["hook_ratio"], t["n_tokens"], len(seqs),
                  torch.get_num_threads())


# --------------------------------------------------------------------------------------------
# The whole study, its conclusion and its metrics


@dataclass(frozen=True)
class PersonaGeometryResult:
    """Every section's result; :meth:`metrics` is what ``metrics.json`` holds."""

    setup: Setup
    plan: LayerPlan
    responses: Responses
    forced: TeacherForced
    analysis: LayerAnalysis
    heat: Heatmaps
    crossed: Crossed
    steer: Steering
    steer_controls: SteeringControls
    headline: SteeringHeadline
    heldout: HeldoutSteering
    timing: Timing
    wall_s: float | None = None  # the whole notebook, wall-clock

    def metrics(self) -> dict[str, Any]:
        setup, stats, best = self.setup, self.analysis.stats, self.analysis.best
        head, sc, crossed, plan = self.headline.head, self.steer_controls, self.crossed, self.plan
        llm, rs, mv = setup.llm, sc.random, sc.matched_summary
        holm_p, holm_reject = crossed.holm()
        did = crossed.get("did")
        summary = self.steer.summary
        by_scale = {method: [{k: float(r[k]) if isinstance(r[k], float) else r[k] for k in _BY_SCALE_COLUMNS}
                             for _, r in summary[summary["method"] == method].iterrows()] for method in llm_steer.METHODS}
        gap_closed = self.headline.gap_closed
        metrics = {
            "model": {"name": llm.name, "weights_file": llm.weights.name, "sha256": llm.sha256, "n_layers": llm.n_layers,
                      "prompt_format": setup.prompt_format, "relative_layers": plan.as_dict()},
            "design": {"personas": setup.core_names, "n_prompts": len(setup.prompts), "layers": list(plan.layers),
                       "decoding": setup.decoding.as_dict(),
                       "centroid_tokens": "positions predicting the shared response tokens",
                       "matched_layers": dict(zip(map(str, setup.depth["seed_layer"]), map(int, setup.depth["our_layer"])))},
            "geometry": {
                "layers": list(plan.layers),
                "rho_by_layer": stats["rho"].tolist(),
                "best_layer": self.analysis.best_layer,
                "best_rho": float(best["rho"]),
                "mantel_p_by_layer": stats["mantel_p"].tolist(),
                "stratified_p_by_layer": stats["stratified_p"].tolist(),
                "partial_rho_by_layer": stats["partial_rho"].tolist(),
                "radial_residual_rho_by_layer": stats["radial_residual_rho"].tolist(),
                "per_prompt_median_rho_by_layer": stats["per_prompt_median_rho"].tolist(),
                "short_ratio_by_layer": [float(v) for v in stats["short_ratio"]],
                "all_gates_by_layer": stats["all_gates"].tolist(),
                "jackknife_range_at_best": [float(best["jackknife_min"]), float(best["jackknife_max"])],
                "centred_rho_by_layer": stats["centred_rho"].tolist(),
                "cos_distance_std_by_layer": stats["cos_distance_std"].tolist(),
                "first_all_gates_layer": self.analysis.first_pass,
                "confirmatory_layer": setup.confirm_layer,
                "decoupled_pairs_at_best": self.heat.decoupled["pair"].tolist(),
                "n_pairs": setup.n_pairs,
                "n_permutations": self.analysis.n_permutations,
            },
            "steering": {
                "layer": self.steer.layer,
                "headline_scale": self.headline.scale,
                "capability_accuracy_base": self.headline.base_acc,
                "paired_wilcoxon_p": self.headline.paired_p,
                "centroid_wins": self.headline.wins,
                "vector_cosine_median": float(np.median(self.steer.cosines)),
                **{method: {
                    "intended_shift": float(head.loc[method, "intended_shift"]),
                    "intended_shift_ci": [head.loc[method, "intended_shift_ci_low"], head.loc[method, "intended_shift_ci_high"]],
                    "spillover": float(head.loc[method, "spillover"]),
                    "spillover_ci": [head.loc[method, "spillover_ci_low"], head.loc[method, "spillover_ci_high"]],
                    "specificity": float(head.loc[method, "specificity"]),
                    "specificity_ci": [head.loc[method, "specificity_ci_low"], head.loc[method, "specificity_ci_high"]],
                    "capability_accuracy_drop": float(head.loc[method, "capability_accuracy_drop"]),
                    "gap_closed": gap_closed[method],
                    "by_scale": by_scale[method],
                } for method in llm_steer.METHODS},
                "random": {k: float(rs[k]) for k in ("intended_shift", "intended_shift_ci_low", "intended_shift_ci_high",
                                                      "spillover", "specificity", "specificity_ci_low", "specificity_ci_high")},
                "matched_effect": {m: {"intended_shift": float(mv.loc[m, "intended_shift"]),
                                       "spillover": float(mv.loc[m, "spillover"]),
                                       "spillover_ci": [mv.loc[m, "spillover_ci_low"], mv.loc[m, "spillover_ci_high"]],
                                       "specificity": float(mv.loc[m, "specificity"]),
                                       "specificity_ci": [mv.loc[m, "specificity_ci_low"], mv.loc[m, "specificity_ci_high"]]}
                                   for m in llm_steer.METHODS},
                "matched_effect_n_personas": len(sc.reachable),
                "matched_effect_spillover_wilcoxon_p": sc.matched_p,
                "matched_effect_target": "centroid intended shift at the headline scale, per persona",
                "heldout_tokens": self.heldout.summary(),
            },
            "crossed": {
                "design": "weights (trained, " + ", ".join(crossed.random_modes) + ") x prompt set (persona, "
                          "length-matched formatting, topic-matched non-persona); headline = (trained - random) x "
                          "(persona - control), averaged over the random modes and both control sets",
                "n_user_prompts": len(crossed.control_ids), "n_system_prompts": len(setup.core_names),
                "n_boot": crossed.n_boot,
                "ci_method": "95% two-way bootstrap: user prompts and system prompts resampled independently "
                             "(scipy.stats.bootstrap, BCa; percentile where BCa is undefined or excludes the "
                             "estimate, widened to the estimate where the percentile interval does too)",
                "ci_method_counts": crossed.ci_methods(),
                "p_method": "bootstrap distribution centred at the estimate (two-sided); Holm across layers "
                            "(statsmodels multipletests)",
                "layers": list(crossed.layers),
                "did_by_layer": {k: v.tolist() for k, v in did.items() if k != "ci_method"},
                "did_block": crossed.block(),
                "holm_p_by_layer": holm_p.tolist(),
                "holm_reject_by_layer": holm_reject.tolist(),
                "p_by_layer": crossed.did_p().tolist(),
                "components": {f"{mode}.{cs}": {
                    "did_by_layer": crossed.get(f"did:{mode}/{cs}")["estimate"].tolist(),
                    "did_block": {k: float(v[0]) for k, v in crossed.get(f"did_block:{mode}/{cs}").items()
                                  if k != "ci_method"}}
                    for mode in crossed.random_modes for cs in llm_controls.CONTROL_SETS},
                "persona_minus_control_by_layer": {k: v.tolist() for k, v in crossed.get("persona_minus_control").items()
                                                   if k != "ci_method"},
                "trained_minus_random_by_layer": {k: v.tolist() for k, v in crossed.get("trained_minus_random").items()
                                                  if k != "ci_method"},
                "cells": {w: {ps: {"rho_by_layer": crossed.get(f"cell:{w}/{ps}")["estimate"].tolist(),
                                   "ci_low": crossed.get(f"cell:{w}/{ps}")["ci_low"].tolist(),
                                   "ci_high": crossed.get(f"cell:{w}/{ps}")["ci_high"].tolist()}
                              for ps in PROMPT_SETS} for w in crossed.weights},
                "system_token_rho_by_layer": {k: v.tolist() for k, v in crossed.get("system_tokens").items()
                                              if k != "ci_method"},
                "mean_centred_rho_by_layer": stats["centred_rho"].tolist(),
                "control_prompts": {cs: crossed.systems[cs] for cs in llm_controls.CONTROL_SETS},
            },
            # wall-clock numbers: the only entries that differ between two runs with the same params
            "timing": {"forward_overhead": round(self.timing.ratio, 2), "hook_overhead": round(self.timing.hook_ratio, 2),
                       "bare_forward_s": round(self.timing.bare_s, 2), "hooked_forward_s": round(self.timing.hooked_s, 2),
                       "timing_tokens": self.timing.n_tokens, "torch_threads": self.timing.threads,
                       "notebook_s": None if self.wall_s is None else round(self.wall_s, 1)},
        }
        return undefined_as_none(metrics)


@dataclass(frozen=True)
class Conclusion:
    """The verdicts the conclusion's prose is built from (each a plain value the notebook formats)."""

    confirm: pd.Series | None  # statistics at the confirmatory layer
    holds_confirm: bool | None
    headline: str
    centroid_better: bool
    ci_separated: bool
    better_every_scale: bool
    strat_floor_layers: int
    stratified_floor: int
    trio_pairs: int
    driver: str
    partial_gap: bool
    controls_pass: bool
    scale_text: str
    contiguous: bool
    at_layers: list[int]
    every_layer_from_first: bool


def conclude(result: PersonaGeometryResult) -> Conclusion:
    """Verdicts: does the agreement hold at seed 001's depth, what the controls and steering show."""
    analysis, head = result.analysis, result.headline.head
    stats, best = analysis.stats, analysis.best
    confirm_layer = result.setup.confirm_layer
    confirm = analysis.at(confirm_layer)
    holds_confirm = None if confirm is None else bool(confirm["all_gates"])
    cent, pv = head.loc["centroid"], head.loc["persona_vector"]
    by_scale_spec = result.steer.summary.pivot(index="scale", columns="method", values="specificity")
    strat_floor_p = np.where(stats["stratified_exact"], 1 / stats["stratified_n_permutations"],
                             1 / (stats["stratified_n_permutations"] + 1))
    trio = {"poet", "comedian", "villain"}
    shifts_positive = bool(cent["intended_shift"] > 0 and pv["intended_shift"] > 0)
    driver = ("lower spillover" if np.log(pv["spillover"] / cent["spillover"])
              > np.log(cent["intended_shift"] / pv["intended_shift"]) else "a larger intended shift") \
        if shifts_positive else "the sign of the intended shift"
    if len(by_scale_spec) > 1:
        falls = bool((by_scale_spec.diff().dropna() < 0).all().all())
        scale_text = (f"; specificity {'falls' if falls else 'does not fall monotonically'} with scale (centroid "
                      f"{by_scale_spec['centroid'].iloc[0]:.1f} at scale {by_scale_spec.index[0]:g}, "
                      f"{by_scale_spec['centroid'].iloc[-1]:.1f} at {by_scale_spec.index[-1]:g}; persona vector "
                      f"{by_scale_spec['persona_vector'].iloc[0]:.1f} and {by_scale_spec['persona_vector'].iloc[-1]:.1f})")
    else:
        scale_text = ""
    if holds_confirm:
        headline = "it holds at seed 001's confirmatory depth"
    elif len(analysis.passing):
        headline = f"seed 001's six gates pass from layer {analysis.first_pass}, not at its confirmatory depth"
    else:
        headline = "seed 001's six gates pass at no layer measured"
    first = analysis.first_pass
    return Conclusion(
        confirm=confirm, holds_confirm=holds_confirm, headline=headline,
        centroid_better=bool(cent["specificity"] > pv["specificity"]),
        ci_separated=bool(cent["specificity_ci_low"] > pv["specificity_ci_high"]
                          or pv["specificity_ci_low"] > cent["specificity_ci_high"]),
        better_every_scale=bool((by_scale_spec["centroid"] > by_scale_spec["persona_vector"]).all()),
        strat_floor_layers=int((stats["stratified_p"] <= strat_floor_p + 1e-12).sum()),
        stratified_floor=int(stats["stratified_n_permutations"].max()),
        trio_pairs=int(sum(len(trio & set(p.strip("()").split(", "))) == 2 for p in result.heat.decoupled["pair"])),
        driver=driver,
        partial_gap=max(result.headline.gap_closed.values()) < 0.5,
        controls_pass=bool(best["gate_cluster_partial"] and best["gate_radial_residual"]
                           and best["gate_per_prompt_median"] and best["gate_short_ratio"]),
        scale_text=scale_text,
        contiguous=bool(np.all(np.diff(stats["layer"]) == 1)),
        at_layers=[layer for layer in dict.fromkeys([confirm_layer, analysis.best_layer]) if layer in result.plan.layers],
        every_layer_from_first=first is not None and len(analysis.passing) == (stats["layer"] >= first).sum(),
    )


# --------------------------------------------------------------------------------------------
# Several models side by side (the README's table, built from their metrics.json)


def _ci(value: float | None, low: float | None, high: float | None, spec: str = "+.3f") -> str:
    if value is None:
        return "—"
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def models_table(runs: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of the headline numbers of several 05a runs (one column per run, from its metrics.json)."""
    rows: dict[str, list[str]] = {}

    def add(label: str, values: list[str]) -> None:
        rows[label] = values

    ms = list(runs.values())
    add("model (layers; prompt format)", [f"{m['model']['name']} ({m['model']['n_layers']}; {m['model']['prompt_format']})"
                                          for m in ms])
    add("pre-registered block (relative depth → layers)",
        [f"{m['model']['relative_layers']['block']['relative'][0]:g}–{m['model']['relative_layers']['block']['relative'][1]:g}"
         f" → L{m['crossed']['did_block']['block'][0]}–L{m['crossed']['did_block']['block'][-1]}" for m in ms])
    add("**DiD (trained − random) × (persona − control), block mean [95% two-way CI]**",
        [f"**{_ci(m['crossed']['did_block']['estimate'], m['crossed']['did_block']['ci_low'], m['crossed']['did_block']['ci_high'])}**"
         for m in ms])
    add("layers with DiD Holm p < 0.05", [f"{sum(m['crossed']['holm_reject_by_layer'])} of {len(m['crossed']['layers'])}"
                                         + ("" if not any(m['crossed']['holm_reject_by_layer']) else " (" + ", ".join(
                                             f"L{x}" for x, r in zip(m['crossed']['layers'], m['crossed']['holm_reject_by_layer'])
                                             if r) + ")") for m in ms])

    def block_mean(m: Mapping[str, Any], values: Sequence[float]) -> float:
        layers, block = m["crossed"]["layers"], m["crossed"]["did_block"]["block"]
        return float(np.mean([values[layers.index(x)] for x in block]))

    add("trained: persona − control ρ, block mean",
        [f"{block_mean(m, m['crossed']['persona_minus_control_by_layer']['estimate']):+.3f}" for m in ms])
    add("persona prompts: trained − random ρ, block mean",
        [f"{block_mean(m, m['crossed']['trained_minus_random_by_layer']['estimate']):+.3f}" for m in ms])
    add("ρ trained × persona, best layer", [f"{m['geometry']['best_rho']:.3f} (L{m['geometry']['best_layer']})" for m in ms])
    add("ρ random (reinit) × persona, max over layers",
        [f"{max(m['crossed']['cells']['reinit']['persona']['rho_by_layer']):.3f}" if "reinit" in m["crossed"]["cells"]
         else "—" for m in ms])
    add("steering, shared-response build: specificity centroid / persona vector",
        [f"{m['steering']['centroid']['specificity']:.2f} / {m['steering']['persona_vector']['specificity']:.2f}" for m in ms])
    add("steering, held-out build at matched shift: spillover difference centroid − persona vector (nats)",
        [_ci(m["steering"]["heldout_tokens"]["difference"], *m["steering"]["heldout_tokens"]["ci"], spec="+.5f")
         + f" (n = {m['steering']['heldout_tokens']['n_personas']} of {len(m['design']['personas'])} personas)" for m in ms])
    lines = ["| | " + " | ".join(runs) + " |", "| --- |" + " --- |" * len(runs)]
    lines += [f"| {label} | " + " | ".join(values) + " |" for label, values in rows.items()]
    return "\n".join(lines)
