"""Belief-state steering (appendix A of seed 000): centroids of belief classes, hooks, KL metrics.

Recipe as the appendix describes it, with the choices it leaves open stated (where it leaves a
definition open, every reasonable reading is computed, not one):

1. Run N contexts of L tokens; take activations at one residual hook at the *final* position and
   the exact Bayes-optimal belief after the L tokens.
2. Marginalise the joint belief onto each factor. A *belief class* of factor f is a distinct
   marginal belief vector (rounded to 1e-6). Processes whose beliefs synchronise (Z1R) have a
   few large classes; fractal processes (Mess3) have a new belief for almost every context, so
   exact classes are singletons. Rule ``"auto"``: use the ``n_classes`` most frequent exact
   classes if each has at least ``min_count`` members, otherwise group contexts by their most
   likely hidden state of that factor (the three lobes of the Mess3 fractal). The seed's tables
   average over 6 ordered pairs, i.e. 3 classes per factor, which both rules give.
3. Centroid c_k of class k = mean activation over its contexts — this averages over whatever the
   *other* factor is doing. Steering vector from source s to target t: c_t - c_s, multiplied by a
   scale c and added by a forward hook at the same hook point, final position only.
4. Metrics per ordered pair, then averaged over the pairs. The appendix does not say how a KL is
   averaged over the source contexts; both readings are computed side by side (``steering_sweep``):
   *per-context* (a KL per context against its own unsteered output, then the mean) and
   *context-averaged* (average the steered / unsteered / target distributions over the source
   contexts, then one KL). Reading-free spillover measures beside them: mean total variation of
   the other factor's marginal and the fraction of contexts whose other-factor argmax flips.
   * ``kl_target`` = D_KL(p^_f || p_target,f): steered factor-f token marginal vs the model's own
     mean factor-f marginal on contexts genuinely in the target class (the appendix's "agreement
     with the target belief state"; taken on the steered factor's marginal so the other factor,
     which steering should leave alone, does not count against it);
   * ``kl_steered`` = D_KL(p^_f || p_f^orig) (intended effect) and ``kl_unsteered`` =
     D_KL(p^_fbar || p_fbar^orig) (spillover), both per context against its own unsteered output;
   * ``ratio`` = mean kl_unsteered / mean kl_steered (the seed tables' "Ratio", lower is better);
     ``ratio_avg`` the same under the context-averaged reading.

Beyond the seed — *conditional* belief-state steering (``method="conditional"``): the marginal
centroid c_t - c_s averages over the other factor, so any interaction between the factors in the
representation (the class centroids of the joint (f, fbar) classes are not exactly additive)
leaks into the other factor. The conditional vector c_(t, j) - c_(s, j) uses the centroids of the
*joint* classes at the source context's own other-factor class j, i.e. "move factor f from s to
t while holding fbar where it is". The other factor's class of each context is decoded from the
model's own activations (a linear probe fitted on separate contexts, then the nearest class
centre), not read from the ground truth, so the method uses only what the model represents.
Where a joint class (t, j) is empty the marginal vector is used for that context.

All pairs x scales are evaluated in one batched forward pass (chunked), not a Python loop over
contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import permutations

import numpy as np
import pandas as pd
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.ghmm import GHMM, ProcessError, marginals
from persona_wm.toy.hooks import add_at_final_position, batched_forward, final_hook, residual_hooks
from persona_wm.toy.probe import fit_probe
from persona_wm.toy.train import eval_tokens, evaluate

__all__ = ["BeliefClasses", "belief_classes", "SteeringSetup", "prepare_steering", "steered_logits", "METHODS",
           "steering_vectors", "final_position", "training_trend", "centroid_interaction",
           "steering_sweep", "summarise_sweep", "total_variation", "partition_violation", "kl_divergence", "final_hook",
           "interaction_frame"]

EPS = 1e-12


def kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """D_KL(p || q) in nats along the last axis (q floored at 1e-12 to keep model zeros finite)."""
    p = np.clip(p, 0.0, None)
    q = np.clip(q, EPS, None)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(np.clip(p, EPS, None)) - np.log(q)), 0.0)
    return terms.sum(-1)


@dataclass(frozen=True)
class BeliefClasses:
    """Class label per context (-1 = in no chosen class), class belief centres and the rule used."""

    labels: np.ndarray  # [N]
    centres: np.ndarray  # [K, S_f] mean marginal belief of each class
    counts: np.ndarray  # [K]
    rule: str


def belief_classes(marginal_beliefs: np.ndarray, n_classes: int = 3, decimals: int = 6,
                   min_count: int = 5, rule: str = "auto") -> BeliefClasses:
    """Group contexts by their marginal belief of one factor (see the module docstring)."""
    if rule not in {"auto", "exact", "argmax"}:
        raise ValueError(f"unknown belief-class rule {rule!r}; use 'auto', 'exact' or 'argmax'")
    keys = np.round(marginal_beliefs, decimals) + 0.0
    unique, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    order = np.argsort(-counts, kind="stable")[:n_classes]
    exact_ok = len(order) == n_classes and counts[order].min() >= min_count
    if rule == "exact" or (rule == "auto" and exact_ok):
        if not exact_ok:
            raise ProcessError(f"only {int((counts >= min_count).sum())} exact belief classes have >= {min_count} "
                               f"members; need {n_classes}")
        labels = np.full(len(keys), -1)
        for k, u in enumerate(order):
            labels[inverse == u] = k
        return BeliefClasses(labels, unique[order], counts[order], "exact")
    labels = marginal_beliefs.argmax(-1)
    present = [k for k in np.argsort(-np.bincount(labels, minlength=marginal_beliefs.shape[-1]), kind="stable")
               if (labels == k).sum() >= min_count][:n_classes]
    present = sorted(present)
    if len(present) < 2:
        raise ProcessError("fewer than two populated belief classes: nothing to steer between")
    remap = np.full(marginal_beliefs.shape[-1], -1)
    remap[present] = np.arange(len(present))
    labels = remap[labels]
    centres = np.stack([marginal_beliefs[labels == k].mean(0) for k in range(len(present))])
    counts = np.array([(labels == k).sum() for k in range(len(present))])
    return BeliefClasses(labels, centres, counts, "argmax")


@dataclass
class SteeringSetup:
    """Everything computed once per (model, contexts, hook): activations, outputs, classes, centroids."""

    process: GHMM
    tokens: np.ndarray  # [N, L]
    hook: str
    activations: np.ndarray  # [N, d] at the hook, final position
    probs: np.ndarray  # [N, X] unsteered next-token distribution at the final position
    factor_probs: list[np.ndarray]  # per factor [N, X_f]
    beliefs: np.ndarray  # [N, S] exact belief after the context
    classes: list[BeliefClasses]  # per factor
    centroids: list[np.ndarray]  # per factor [K_f, d]
    decoded: list[np.ndarray]  # per factor [N] class decoded from the activations (-1 = none)
    joint_centroids: dict[tuple[int, int, int], np.ndarray]  # (factor, class of f, class of other) -> [d]


def final_position(model, process: GHMM, tokens: np.ndarray, hook: str, batch: int = 4096):
    """Activations at ``hook`` and next-token distributions, both at the final position."""
    forward = batched_forward(model, tokens, process.n_tokens, batch=batch, cache=[hook], final_only=True)
    return forward.residuals[hook], forward.probs


def _decode_classes(acts: np.ndarray, decoder_acts: np.ndarray, decoder_beliefs: list[np.ndarray],
                    classes: list[BeliefClasses]) -> list[np.ndarray]:
    """Each context's class per factor, read from its activations: probe -> nearest class centre."""

    decoded = []
    for marginal, cls in zip(decoder_beliefs, classes):
        probe = fit_probe(decoder_acts, marginal, groups=np.arange(len(decoder_acts)))
        predicted = probe.predict(acts)
        distance = ((predicted[:, None, :] - cls.centres[None]) ** 2).sum(-1)
        decoded.append(distance.argmin(1))
    return decoded


def prepare_steering(model, process: GHMM, tokens: np.ndarray, hook: str | None = None, n_classes: int = 3,
                     min_count: int = 5, rule: str = "auto", decoder_tokens: np.ndarray | None = None
                     ) -> SteeringSetup:
    """Activations at ``hook`` (final position), outputs, per-factor belief classes and centroids.

    ``decoder_tokens`` (separate contexts) train the probes that decode each context's classes for
    conditional steering; without them the exact classes are used (an oracle, for tests).
    """
    if not process.factor_states or not process.factor_tokens:
        raise ProcessError(f"steering needs a factored process (factor states and tokens); {process.name!r} has none")
    hook = hook or final_hook(model)
    acts, probs = final_position(model, process, tokens, hook)
    beliefs = process.beliefs(tokens)[:, -1]
    classes, centroids = [], []
    for marginal in marginals(beliefs, process.factor_states):
        cls = belief_classes(marginal, n_classes=n_classes, min_count=min_count, rule=rule)
        classes.append(cls)
        centroids.append(np.stack([acts[cls.labels == k].mean(0) for k in range(len(cls.counts))]))
    if decoder_tokens is None:
        decoded = [cls.labels for cls in classes]
    else:
        decoder_acts, _ = final_position(model, process, decoder_tokens, hook)
        decoder_beliefs = marginals(process.beliefs(decoder_tokens)[:, -1], process.factor_states)
        decoded = _decode_classes(acts, decoder_acts, decoder_beliefs, classes)
    joint = {}
    for f in range(len(classes)):
        for g in range(len(classes)):
            if g == f:
                continue
            for i in range(len(classes[f].counts)):
                for j in range(len(classes[g].counts)):
                    members = (classes[f].labels == i) & (classes[g].labels == j)
                    if members.any():
                        joint[(f, i, j)] = acts[members].mean(0)
    return SteeringSetup(process, np.asarray(tokens), hook, acts, probs, marginals(probs, process.factor_tokens),
                         beliefs, classes, centroids, decoded, joint)


def steered_logits(model, tokens: np.ndarray, n_tokens: int, hook: str, vectors: np.ndarray,
                   batch: int = 4096) -> np.ndarray:
    """Final-position next-token distributions with ``vectors[i]`` added at ``hook`` (final position) for row i."""
    return batched_forward(model, tokens, n_tokens, batch=batch, patch=add_at_final_position(hook, vectors),
                           final_only=True).probs


def _pair_rows(setup: SteeringSetup, factor: int, scales: Sequence[float], sources: np.ndarray | None = None):
    """Row index, pair and scale of every (ordered pair, scale, source context) to evaluate.

    With ``sources`` given, only contexts among them are steered, and only between classes that
    occur among them (steering inside one sector of an SFP).
    """
    cls = setup.classes[factor]
    present = np.unique(cls.labels if sources is None else cls.labels[sources])
    rows, pairs, row_scale = [], [], []
    for s, t in permutations([int(k) for k in present if k >= 0], 2):
        src = np.flatnonzero(cls.labels == s)
        if sources is not None:
            src = np.intersect1d(src, sources)
        for c in scales:
            rows.append(src)
            pairs += [(s, t)] * len(src)
            row_scale += [c] * len(src)
    return np.concatenate(rows) if rows else np.zeros(0, int), np.array(pairs).reshape(-1, 2), np.array(row_scale)


METHODS = ("centroid", "conditional")


def steering_vectors(setup: SteeringSetup, factor: int, idx: np.ndarray, pairs: np.ndarray,
                     method: str = "centroid") -> np.ndarray:
    """Unit-scale steering vector of each row (context ``idx[r]``, pair ``pairs[r]``)."""
    if method not in METHODS:
        raise ValueError(f"unknown steering method {method!r}; use one of {METHODS}")
    cents = setup.centroids[factor]
    vectors = cents[pairs[:, 1]] - cents[pairs[:, 0]]
    if method == "conditional":
        if len(setup.classes) != 2:
            raise ProcessError("conditional steering is implemented for two-factor processes")
        other = setup.decoded[1 - factor][idx]
        for r, (s, t) in enumerate(pairs):
            src, tgt = setup.joint_centroids.get((factor, s, other[r])), setup.joint_centroids.get((factor, t, other[r]))
            if src is not None and tgt is not None:
                vectors[r] = tgt - src
    return vectors


def total_variation(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Total variation distance 0.5 * sum |p - q| along the last axis (bounded in [0, 1])."""
    return 0.5 * np.abs(p - q).sum(-1)


def steering_sweep(model, setup: SteeringSetup, factor: int, scales: Sequence[float],
                   method: str = "centroid") -> pd.DataFrame:
    """Per (ordered pair, scale): the appendix's three KLs under both readings, plus bounded spillover.

    Appendix A does not say how the KLs are averaged over the source contexts, so both readings
    are computed from the same steered forward pass:

    * **per-context** (``kl_target``, ``kl_steered``, ``kl_unsteered``): the KL of each source
      context's steered marginal against its own unsteered marginal (or the target marginal),
      then the mean over the pair's source contexts;
    * **context-averaged** (``*_avg``): the steered, unsteered and target marginals are first
      averaged over the pair's source contexts, then one KL is taken. Shifts of opposite sign in
      different contexts cancel in the average, so this reading is never larger than the first
      (KL is jointly convex).

    Reading-free spillover measures: ``tv_unsteered`` = mean over contexts of the total variation
    between the other factor's steered and unsteered marginals (in [0, 1]); ``argmax_flip`` = the
    fraction of contexts whose most likely other-factor token changes. ``tv_steered`` is the same
    TV for the steered factor (the intended effect on a bounded scale).
    """
    n_f = len(setup.factor_probs)
    if not 0 <= factor < n_f:
        raise ProcessError(f"factor {factor} out of range: the process has {n_f} factors")
    idx, pairs, scale = _pair_rows(setup, factor, scales)
    vectors = scale[:, None] * steering_vectors(setup, factor, idx, pairs, method)
    steered = steered_logits(model, setup.tokens[idx], setup.process.n_tokens, setup.hook, vectors)
    steered_f = marginals(steered, setup.process.factor_tokens)
    labels = setup.classes[factor].labels
    target_marginal = np.stack([setup.factor_probs[factor][labels == k].mean(0)
                                for k in range(len(setup.classes[factor].counts))])
    other = [g for g in range(n_f) if g != factor]
    orig = [setup.factor_probs[g][idx] for g in range(n_f)]
    frame = pd.DataFrame({
        "source": pairs[:, 0], "target": pairs[:, 1], "scale": scale,
        "kl_target": kl_divergence(steered_f[factor], target_marginal[pairs[:, 1]]),
        "kl_steered": kl_divergence(steered_f[factor], orig[factor]),
        "kl_unsteered": np.sum([kl_divergence(steered_f[g], orig[g]) for g in other], axis=0),
        "tv_steered": total_variation(steered_f[factor], orig[factor]),
        "tv_unsteered": np.mean([total_variation(steered_f[g], orig[g]) for g in other], axis=0),
        "argmax_flip": np.mean([steered_f[g].argmax(-1) != orig[g].argmax(-1) for g in other], axis=0),
    })
    keys = ["source", "target", "scale"]
    per_pair = frame.groupby(keys, as_index=False).mean()
    # context-averaged reading: average the distributions over each (pair, scale) group, then one KL
    groups = frame.groupby(keys, sort=True).ngroup().to_numpy()
    n_groups = groups.max() + 1 if len(groups) else 0
    counts = np.bincount(groups, minlength=n_groups)[:, None]

    def group_mean(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n_groups, values.shape[-1]))
        np.add.at(out, groups, values)
        return out / counts

    first = pd.DataFrame({"g": groups, "t": pairs[:, 1]}).groupby("g")["t"].first().to_numpy()
    mean_steered = [group_mean(steered_f[g]) for g in range(n_f)]
    mean_orig = [group_mean(orig[g]) for g in range(n_f)]
    averaged = pd.DataFrame({
        "kl_target_avg": kl_divergence(mean_steered[factor], target_marginal[first]),
        "kl_steered_avg": kl_divergence(mean_steered[factor], mean_orig[factor]),
        "kl_unsteered_avg": np.sum([kl_divergence(mean_steered[g], mean_orig[g]) for g in other], axis=0),
    })
    return pd.concat([per_pair.reset_index(drop=True), averaged], axis=1)


def summarise_sweep(per_pair: pd.DataFrame) -> pd.DataFrame:
    """Average over ordered pairs per scale; ratio = mean spillover / mean intended shift (NaN at 0).

    ``ratio`` is the per-context reading, ``ratio_avg`` the context-averaged one (see
    :func:`steering_sweep`); ``ratio_pairs`` is a third aggregation the seed's rounding admits:
    the mean over ordered pairs of each pair's own per-context ratio.
    """
    columns = [c for c in ("kl_target", "kl_steered", "kl_unsteered", "kl_target_avg", "kl_steered_avg",
                           "kl_unsteered_avg", "tv_steered", "tv_unsteered", "argmax_flip") if c in per_pair]
    table = per_pair.groupby("scale")[columns].mean()
    for suffix in ("", "_avg"):
        if f"kl_steered{suffix}" not in table:
            continue
        moved = table[f"kl_steered{suffix}"] > 1e-9  # at scale 0 nothing moves and the ratio is undefined
        table[f"ratio{suffix}"] = (table[f"kl_unsteered{suffix}"] / table[f"kl_steered{suffix}"].where(moved)
                                   ).where(moved)
    pair_ratio = (per_pair.kl_unsteered / per_pair.kl_steered.where(per_pair.kl_steered > 1e-9))
    table["ratio_pairs"] = pair_ratio.groupby(per_pair.scale).mean()
    return table.reset_index()


def partition_violation(model, setup: SteeringSetup, sector: str, scales: Sequence[float],
                        method: str = "centroid") -> pd.DataFrame:
    """Forbidden-token and target-class mass when steering inside one sector of an SFP (Table 6).

    Source contexts: those whose belief lies entirely in sector V_sigma (the sector is known).
    Steered factor: the one with at least two belief classes inside the sector. Forbidden tokens:
    joint tokens that no state of V_sigma can emit (zero probability under the partition).
    Target-class tokens: the support of the Bayes-optimal next-token distribution of contexts
    genuinely in (this sector, target class). Returns per scale the mean forbidden and target mass.
    """
    process = setup.process
    if process.partition is None or sector not in (process.partition_labels or ()):
        raise ProcessError(f"unknown sector {sector!r}; sectors of {process.name!r}: {process.partition_labels}")
    states = list(process.partition[process.partition_labels.index(sector)])
    inside = np.flatnonzero(setup.beliefs[:, states].sum(-1) > 1 - 1e-9)
    factor = next((f for f, cls in enumerate(setup.classes)
                   if len(np.unique(cls.labels[inside][cls.labels[inside] >= 0])) >= 2), None)
    if factor is None:
        raise ProcessError(f"no factor has two belief classes inside sector {sector}: nothing to steer")
    forbidden = process.emission[states].max(0) <= 0  # [X]
    optimal = process.next_token_probs(setup.beliefs)  # [N, X]
    labels = setup.classes[factor].labels
    idx, pairs, scale = _pair_rows(setup, factor, scales, sources=inside)
    support = {t: optimal[np.intersect1d(np.flatnonzero(labels == t), inside)].max(0) > 1e-12
               for t in np.unique(pairs[:, 1])}
    vectors = scale[:, None] * steering_vectors(setup, factor, idx, pairs, method)
    steered = steered_logits(model, setup.tokens[idx], process.n_tokens, setup.hook, vectors)
    target_mass = np.array([steered[i, support[t]].sum() for i, t in enumerate(pairs[:, 1])])
    frame = pd.DataFrame({"scale": scale, "forbidden": steered[:, forbidden].sum(-1), "target": target_mass})
    out = frame.groupby("scale", as_index=False).mean()
    out.insert(0, "sector", sector)
    out["steered_factor"] = factor
    return out


def _contexts(trained, n_sequences: int, seed: int, model_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Steering contexts and (separate) decoder contexts of one model, seeded by (seed, model seed)."""
    rng = np.random.default_rng([seed, model_seed, 7])
    length = trained.config.context_length
    return trained.process.sample(n_sequences, length, rng), trained.process.sample(4 * n_sequences, length, rng)


def steering_frame(models: dict, scales: Sequence[float], n_sequences: int = 500, seed: int = 0,
                   methods: Sequence[str] = METHODS, hooks: Sequence[str] | None = None,
                   progress: bool = True) -> pd.DataFrame:
    """Steering summaries for every (process, seed) model x hook x method x factor x scale.

    ``hooks`` defaults to the final layer's residual stream (the appendix's setting); pass every
    residual hook to measure the layer dependence of specificity.
    """

    rows = []
    for (proc, model_seed), trained in tqdm(models.items(), desc="steering", disable=not progress):
        tokens, decoder = _contexts(trained, n_sequences, seed, model_seed)
        for hook in hooks or [final_hook(trained.model)]:
            setup = prepare_steering(trained.model, trained.process, tokens, hook, decoder_tokens=decoder)
            decode_accuracy = float(np.mean([(d == c.labels)[c.labels >= 0].mean()
                                             for d, c in zip(setup.decoded, setup.classes)]))
            for method in methods:
                for factor in range(len(setup.classes)):
                    table = summarise_sweep(steering_sweep(trained.model, setup, factor, scales, method))
                    rows += [{"process": proc, "seed": model_seed, "hook": hook, "method": method, "factor": factor,
                              "class_rule": setup.classes[factor].rule, "decode_accuracy": decode_accuracy, **r}
                             for r in table.to_dict("records")]
    return pd.DataFrame(rows)


def partition_frame(models: dict, sectors: Sequence[str], scales: Sequence[float], n_sequences: int = 500,
                    seed: int = 0, methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """Table-6 partition-violation analysis for every model, sector and method (final layer)."""
    rows = []
    for (proc, model_seed), trained in models.items():
        tokens, decoder = _contexts(trained, n_sequences, seed, model_seed)
        setup = prepare_steering(trained.model, trained.process, tokens, decoder_tokens=decoder)
        for method in methods:
            for sector in sectors:
                frame = partition_violation(trained.model, setup, sector, scales, method)
                rows += [{"process": proc, "seed": model_seed, "method": method, **r} for r in frame.to_dict("records")]
    return pd.DataFrame(rows)


def centroid_interaction(setup: SteeringSetup) -> float:
    """Fraction of the joint-class centroid variance that is *not* additive over the two factors.

    Fit c(i, j) ~ u_i + v_j (two-way ANOVA on the centroids of the joint classes): if the
    residual is zero, the marginal steering vector c_t - c_s is the same for every other-factor
    class and steering one factor cannot move the other through the representation; the
    residual fraction is what marginal centroid steering leaks. Only joint classes that occur
    are used; empty cells make the additive fit approximate.
    """
    if len(setup.classes) != 2:
        raise ProcessError("centroid_interaction needs a two-factor process")
    ka, kb = (len(c.counts) for c in setup.classes)
    la, lb = (c.labels for c in setup.classes)
    cells = [(i, j) for i in range(ka) for j in range(kb) if ((la == i) & (lb == j)).any()]
    centres = np.stack([setup.activations[(la == i) & (lb == j)].mean(0) for i, j in cells])
    design = np.zeros((len(cells), ka + kb))
    for r, (i, j) in enumerate(cells):
        design[r, i] = design[r, ka + j] = 1.0
    fitted = design @ np.linalg.lstsq(design, centres, rcond=None)[0]
    total = ((centres - centres.mean(0)) ** 2).sum()
    return float(((centres - fitted) ** 2).sum() / total) if total > 0 else float("nan")


def interaction_frame(models: dict, n_sequences: int = 500, seed: int = 0) -> pd.DataFrame:
    """:func:`centroid_interaction` at every residual hook of every (process, seed) model.

    Contexts are the steering contexts of :func:`steering_frame` (same generator, same draw), and the
    classes their exact belief classes. Rows: process, seed, hook, non-additive fraction.
    """
    rows = []
    for (proc, model_seed), trained in models.items():
        tokens, _ = _contexts(trained, n_sequences, seed, model_seed)
        for hook in residual_hooks(trained.model):
            setup = prepare_steering(trained.model, trained.process, tokens, hook)
            rows.append({"process": proc, "seed": model_seed, "hook": hook,
                         "non-additive fraction": centroid_interaction(setup)})
    return pd.DataFrame(rows)


def training_trend(trained, n_sequences: int, seed: int, scale: float = 1.0) -> list[dict]:
    """Additivity and seed-method specificity at every saved training snapshot of one model.

    Per snapshot: CE / optimal on the config's fixed evaluation contexts, the final-layer
    non-additive fraction of the joint-class centroids (:func:`centroid_interaction`) and the
    seed-method (marginal centroid) spillover ratio at ``scale`` under both readings, averaged over
    the two factors. Snapshots whose classes cannot be formed are skipped.
    """

    process = trained.process
    tokens, _ = _contexts(trained, n_sequences, seed, trained.config.seed)
    evaluation = eval_tokens(trained.config, process)
    rows = []
    for step in sorted(trained.snapshots):
        model = trained.snapshot_model(step)
        try:
            setup = prepare_steering(model, process, tokens)
        except ProcessError:
            continue
        tables = [summarise_sweep(steering_sweep(model, setup, f, [scale])) for f in range(len(setup.classes))]
        rows.append({"steps": int(step), "ce_ratio": evaluate(model, process, evaluation)["ce_ratio"],
                     "interaction": centroid_interaction(setup),
                     "ratio": float(np.mean([t.ratio.iloc[0] for t in tables])),
                     "ratio_avg": float(np.mean([t.ratio_avg.iloc[0] for t in tables]))})
    return rows
