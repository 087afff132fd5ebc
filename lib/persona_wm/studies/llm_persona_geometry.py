"""Study 05a (LLM persona geometry and steering specificity): the section functions the notebook calls
and the frozen dataclasses its results live in.

Each function computes one section of ``notebooks/05a_llm_persona_geometry.py`` and returns a frozen
dataclass; :class:`PersonaGeometryResult` assembles them and :meth:`PersonaGeometryResult.metrics`
builds the dict ``metrics.json`` is written from. The arithmetic is the notebook's, moved here
unchanged (same calls, same order, same seeds), so ``metrics.json`` is byte-identical to the
notebook-only version's apart from the wall-clock ``timing`` entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pingouin as pg
import torch
from tqdm.auto import tqdm

from persona_wm.analysis import geometry
from persona_wm.core.values import undefined_as_none
from persona_wm.llm import controls as llm_controls
from persona_wm.llm import steer as llm_steer
from persona_wm.llm.model import (
    LLM,
    Decoding,
    cached_generate,
    chat_prompt_ids,
    encode,
    load_llm,
    persona_pass,
    scored_sequence,
    time_forward_overhead,
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
    "Controls",
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
    "forward_timing",
    "heatmaps",
    "layer_analysis",
    "load_setup",
    "run_controls",
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
        return self.depth.rename(columns={"seed_layer": "seed 001 layer (of 28)", "seed_rho": "seed rho",
                                          "our_layer": "SmolLM2 layer (of 30)"})


def load_setup(personas: Sequence[str], n_prompts: int, max_new_tokens: int, repetition_penalty: float, *,
               model: str | None, device: str, threads: int) -> Setup:
    """Load the model (offline), check the personas and map seed 001's layers to ours by relative depth."""
    llm = load_llm(model=model, device=device, threads=threads)
    names = check_personas(list(personas)) + [ANCHOR]
    depth = pd.DataFrame({"seed_layer": list(SEED_RHO), "seed_rho": list(SEED_RHO.values())})
    depth["our_layer"] = [geometry.matched_layer(L, SEED_N_LAYERS, llm.n_layers) for L in depth["seed_layer"]]
    return Setup(llm=llm, names=names, prompts=list(PROMPTS[:n_prompts]),
                 decoding=Decoding(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty), depth=depth)


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


@dataclass(frozen=True)
class Controls:
    """Rho by layer of the persona condition and its controls on the same prompts, with bootstrap CIs."""

    control_ids: list[int]
    control_systems: list[str]
    random_modes: list[str]
    control_rho: dict[str, dict[str, np.ndarray]]
    other_seed_rho: dict[int, np.ndarray]
    layers: list[int]
    n_boot: int

    @property
    def control_names(self) -> list[str]:
        return [k for k in self.control_rho if k != "persona"]

    def length_table(self, setup: Setup, n: int = 3) -> pd.DataFrame:
        """The first ``n`` control prompts with their token counts beside their persona prompt's."""
        llm, systems = setup.llm, setup.systems
        return pd.DataFrame([{"prompt": self.control_systems[k], "tokens": len(encode(llm, self.control_systems[k])),
                              "persona prompt tokens": len(encode(llm, systems[k]))} for k in range(n)])

    def frame(self, centred_rho: np.ndarray) -> pd.DataFrame:
        """Long frame (layer, condition, rho, CIs, paired differences), mean-centred rho of all prompts last."""
        return pd.concat([pd.DataFrame({"layer": self.layers, "condition": name, **r})
                          for name, r in self.control_rho.items()]
                         + [pd.DataFrame({"layer": self.layers, "condition": "mean-centred (all prompts)",
                                          "rho": centred_rho})])

    def table(self, centred_rho: np.ndarray) -> pd.DataFrame:
        frame = self.frame(centred_rho)
        return frame[frame.condition != "persona"].pivot_table(
            index="layer", columns="condition", values=["rho", "diff", "diff_ci_low", "diff_ci_high"])

    def lengths_match(self, setup: Setup) -> bool:
        """Every control prompt has its persona prompt's token count."""
        return all(len(encode(setup.llm, c)) == len(encode(setup.llm, s))
                   for c, s in zip(self.control_systems, setup.systems[: setup.anchor]))


def _means_js(passes: Sequence[dict[str, torch.Tensor]], layer_index: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-prompt centroids at ``layer_index`` [n_prompts, P, L, d] and JS [n_prompts, P, P] of control passes."""
    return (np.stack([p["means"][:, layer_index].numpy() for p in passes]),
            np.stack([p["js"].numpy() for p in passes]))


def run_controls(setup: Setup, responses: Responses, forced: TeacherForced, layers: Sequence[int],
                 n_control_prompts: int, random_modes: Sequence[str], extra_random_seeds: Sequence[int],
                 short_tokens: int, n_boot: int, seed: int) -> Controls:
    """Length-matched non-persona prompts, random-weights models (each mode, and extra initialisations
    without bootstrap) and system-token centroids through the persona pipeline; bootstrap over prompts."""
    llm, anchor, prompts, systems = setup.llm, setup.anchor, setup.prompts, setup.systems
    layer_index = [layer - 1 for layer in layers]
    control_ids = list(range(min(n_control_prompts, len(prompts))))
    control_systems = llm_controls.length_matched_controls(lambda text: encode(llm, text), systems[:anchor])
    control_passes = [persona_pass(llm, control_systems, prompts[i], responses.ids[i], short_tokens=short_tokens)
                      for i in tqdm(control_ids, desc="control-prompt passes")]
    random_passes = {}
    for mode in random_modes:
        random_llm = llm_controls.random_weights_llm(llm, seed, mode)
        random_passes[mode] = [persona_pass(random_llm, systems[:anchor], prompts[i], responses.ids[i],
                                            short_tokens=short_tokens) for i in tqdm(control_ids, desc=f"{mode} passes")]
        del random_llm
    other_seed_rho = {}  # is the random-weights rho a property of one initialisation? (no bootstrap: point values)
    for random_seed in extra_random_seeds:
        random_llm = llm_controls.random_weights_llm(llm, random_seed, "reinit")
        rp = [persona_pass(random_llm, systems[:anchor], prompts[i], responses.ids[i], short_tokens=short_tokens)
              for i in tqdm(control_ids, desc=f"reinit seed {random_seed} passes")]
        means, js = _means_js(rp, layer_index)
        other_seed_rho[random_seed] = llm_controls.rho_by_layer(means.mean(0), js.mean(0))
        del random_llm
    system_means = llm_controls.system_token_means(llm, systems[:anchor], prompts[0], layers).numpy()
    core = setup.core
    persona_js = forced.js_prompt_all[control_ids][:, core][:, :, core]
    per_prompt = {"persona": (np.stack([forced.passes[i]["means"][core][:, layer_index].numpy() for i in control_ids]),
                              persona_js),
                  "length-matched control": _means_js(control_passes, layer_index),
                  "system tokens": (np.repeat(system_means[None], len(control_ids), 0), persona_js)}
    per_prompt |= {f"random weights ({mode})": _means_js(rp, layer_index) for mode, rp in random_passes.items()}
    control_rho = llm_controls.bootstrap_rho(per_prompt, n_boot=n_boot, seed=seed, reference="persona")
    return Controls(control_ids, control_systems, list(random_modes), control_rho, other_seed_rho, list(layers), n_boot)


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
    responses: Responses
    forced: TeacherForced
    analysis: LayerAnalysis
    heat: Heatmaps
    controls: Controls
    steer: Steering
    steer_controls: SteeringControls
    headline: SteeringHeadline
    timing: Timing

    def metrics(self) -> dict[str, Any]:
        setup, stats, best = self.setup, self.analysis.stats, self.analysis.best
        head, sc, controls = self.headline.head, self.steer_controls, self.controls
        llm, rs, mv, control_rho = setup.llm, sc.random, sc.matched_summary, controls.control_rho
        summary = self.steer.summary
        by_scale = {method: [{k: float(r[k]) if isinstance(r[k], float) else r[k] for k in _BY_SCALE_COLUMNS}
                             for _, r in summary[summary["method"] == method].iterrows()] for method in llm_steer.METHODS}
        gap_closed = self.headline.gap_closed
        metrics = {
            "model": {"name": llm.name, "weights_file": llm.weights.name, "sha256": llm.sha256, "n_layers": llm.n_layers},
            "design": {"personas": setup.core_names, "n_prompts": len(setup.prompts), "layers": list(controls.layers),
                       "decoding": setup.decoding.as_dict(),
                       "centroid_tokens": "positions predicting the shared response tokens",
                       "matched_layers": dict(zip(map(str, setup.depth["seed_layer"]), map(int, setup.depth["our_layer"])))},
            "geometry": {
                "layers": list(controls.layers),
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
            },
            "controls": {
                "n_prompts": len(controls.control_ids),
                "n_boot": controls.n_boot,
                "ci_method": "95% BCa bootstrap (scipy.stats.bootstrap) over prompts, the same draws for every "
                             "condition (paired differences)",
                "layers": list(controls.layers),
                "persona_rho_by_layer": control_rho["persona"]["rho"].tolist(),
                "length_matched_rho_by_layer": control_rho["length-matched control"]["rho"].tolist(),
                "random_model_rho_by_layer": {mode: control_rho[f"random weights ({mode})"]["rho"].tolist()
                                              for mode in controls.random_modes},
                "random_model_rho_other_seeds": {str(k): v.tolist() for k, v in controls.other_seed_rho.items()},
                "mean_centred_rho_by_layer": stats["centred_rho"].tolist(),
                "system_token_rho_by_layer": control_rho["system tokens"]["rho"].tolist(),
                "persona_minus_control": {name: {k: control_rho[name][k].tolist()
                                                 for k in ("diff", "diff_ci_low", "diff_ci_high", "ci_low", "ci_high")}
                                          for name in controls.control_names},
                "control_prompts": controls.control_systems,
            },
            # wall-clock numbers: the only entries that differ between two runs with the same params
            "timing": {"forward_overhead": round(self.timing.ratio, 2), "hook_overhead": round(self.timing.hook_ratio, 2),
                       "bare_forward_s": round(self.timing.bare_s, 2), "hooked_forward_s": round(self.timing.hooked_s, 2),
                       "timing_tokens": self.timing.n_tokens, "torch_threads": self.timing.threads},
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
        at_layers=[layer for layer in dict.fromkeys([confirm_layer, analysis.best_layer]) if layer in result.controls.layers],
        every_layer_from_first=first is not None and len(analysis.passing) == (stats["layer"] >= first).sum(),
    )
