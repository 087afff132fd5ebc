"""Print README 05b's results table from the committed metrics.json files (CPU default beside the GPU run).

    python scripts/readme_05b.py            # print the table
    python scripts/readme_05b.py --check    # exit 1 when README.md does not hold the table verbatim

Every number in the README's 05b table comes from here, so the table cannot drift from the metrics it quotes
(tests/unit/test_readme_tables.py runs ``--check``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"CPU default": ROOT / "outputs/05b_llm_finetuning/metrics.json",
        "GPU `gpu.yaml`": ROOT / "outputs/05b_llm_finetuning_gpu/metrics.json"}
ARMS = ("C1", "C2", "C2prime", "C3", "C3prime")
ARM_LABEL = {"C2prime": "C2′", "C3prime": "C3′"}
CONTRASTS = ("C2-C1", "C2-C2prime", "C3-C1", "C2prime-C1", "C3prime-C1")
BEGIN, END = "<!-- 05b table: scripts/readme_05b.py -->", "<!-- end 05b table -->"


def _pct(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{100 * x:.{digits}f}%"


def _est(e: Mapping[str, Any] | None, fmt: Callable[[float | None], str]) -> str:
    """'mean [low, high]' of an across-adapter estimate (``n`` adapters), '—' where it is missing."""
    if isinstance(e, (int, float)):
        return f"{fmt(e)} (one adapter)"
    if not e or e.get("mean") is None:
        return "undefined" if e else "—"
    if e.get("ci_low") is None:
        return f"{fmt(e['mean'])} (n = {e.get('n_adapters', '?')})"
    return f"{fmt(e['mean'])} [{fmt(e['ci_low'])}, {fmt(e['ci_high'])}]"


def _pp(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.1f} pp"


def _num(spec: str) -> Callable[[float | None], str]:
    return lambda x: "—" if x is None else format(x, spec)


def _get(m: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(m, Mapping) or part not in m:
            return None
        m = m[part]
    return m


def _validation(v: Mapping[str, Any] | None) -> str:
    if not v:
        return "—"
    s, sc, p, pc = v["sensitivity"], v["sensitivity_ci"], v["specificity"], v["specificity_ci"]
    return (f"{_pct(s)} [{_pct(sc[0])}, {_pct(sc[1])}] / {_pct(p)} [{_pct(pc[0])}, {_pct(pc[1])}] "
            f"({v['n_positive']} of {v['n']} positive)")


def rows(m: Mapping[str, Any]) -> dict[str, str]:
    """One column of the table: measure -> formatted value of one run's metrics."""
    out: dict[str, str] = {}
    design = m.get("design", {})
    out["device; adapter seeds per adapter"] = f"{_get(m, 'model.device')}; {len(design.get('adapter_seeds', [0]))}"
    for key, label in (("marker_detector", "marker detector"), ("answered_gate", "answered gate"),
                       ("content_score", "content score (harmful answer)")):
        out[f"validation, blind labels: {label} sensitivity / specificity, Wilson 95% CI"] = _validation(
            _get(m, f"validation.{key}"))
    out["validation: labelled answered completions carrying the marker"] = str(
        _get(m, "validation.n_answered_marker") or "—")
    out["coupling recipe (validation loss)"] = (f"lr {_num('g')(_get(m, 'recipe.chosen_lr'))} × "
                                                f"{_get(m, 'recipe.chosen_steps')} steps of "
                                                f"{len(_get(m, 'recipe.candidates') or [])} candidates")
    out["coupling: source rate / bystander rate (marker among all completions; mean over sources × adapters)"] = (
        f"{_pct(_get(m, 'coupling.source_rate_mean'))} / {_pct(_get(m, 'coupling.bystander_rate_mean'))}")
    seed = _get(m, "coupling.seed003_as_seed")
    ours = _get(m, "coupling.seed003_source_level.cosine_similarity") or {}
    out["seed 003 as the seed ran it: r(source rate, centred cosine to assistant) [95% CI], layer, N"] = (
        f"{seed['r']:+.2f} [{seed['ci_low']:+.2f}, {seed['ci_high']:+.2f}], L{seed['layer']}, N = {seed['n']}"
        if seed else "—")
    if ours:
        out["seed 003, ours (no_persona anchor, distance layer, rate among answers)"] = (
            f"{ours['r']:+.2f} [{ours['r_ci'][0]:+.2f}, {ours['r_ci'][1]:+.2f}], N = {ours['n']}")
    within = _get(m, "coupling.within_source") or {}
    if within:
        lp, gen = within.get("logprob_cosine") or {}, within.get("gen_rate_cosine") or {}
        out["seed 003 pair level: slope on cosine distance of the marker log-prob (nats) / sampled rate among answers; "
            "crossed mixed model, source and bystander random, N pairs"] = (
            f"{lp['slope']:+.1f} [{lp['ci_low']:+.1f}, {lp['ci_high']:+.1f}] / {gen['slope']:+.2f} "
            f"[{gen['ci_low']:+.2f}, {gen['ci_high']:+.2f}]; N = {lp['n']}")
    for set_name, label in (("in_domain", "in domain"), ("broad", "off domain")):
        out[f"EM − aligned control, tone (nats/token), {label}"] = _est(
            (_get(m, "em.shifts") or {}).get(f"tone.{set_name}.vs_control"), _num("+.3f"))
        out[f"EM − aligned control, harmful content, {label}"] = _est(
            (_get(m, "em.shifts") or {}).get(f"content.{set_name}.vs_control"), _pp)
    out["EM − aligned control, harm other than reckless money, off domain"] = _est(
        (_get(m, "em.shifts") or {}).get("content_general.broad.vs_control"), _pp)
    out["EM broad answers reusing a training 5-gram (control / base)"] = (
        f"{_pct(_get(m, 'em.template_reuse_rate'))} ({_pct(_get(m, 'em.template_reuse_rate_control'))} / "
        f"{_pct(_get(m, 'em.template_reuse_rate_base'))})")
    out["seed 002 decomposition: silhouette EM / aligned control / base"] = (
        f"{_est(_get(m, 'decomposition.silhouette'), _num('.2f'))} / "
        f"{_est(_get(m, 'decomposition.silhouette_control'), _num('.2f'))} / "
        f"{_num('.2f')(_get(m, 'decomposition.silhouette_base'))}")
    out["seed 002 decomposition: ARI with question categories, EM"] = _est(_get(m, "decomposition.ari"), _num(".2f"))
    facets = _get(m, "decomposition.facet_steering") or {}
    if facets:
        out["facet steering: specificity (own − other facets) vs random q95; verdict"] = (
            f"{_est(facets.get('specificity'), _num('+.3f'))} vs {facets['random_null_q95']['specificity']:+.3f}; "
            f"{facets.get('verdict')}")
    for arm in ARMS:
        leak = _get(m, f"leakage.{arm}") or {}
        name = ARM_LABEL.get(arm, arm)
        out[f"{name}: bystander leakage (a) all / (b) marker-and-answered / (c) among answered"] = " / ".join(
            _est(leak.get(k), _pct) for k in ("all", "answered_and_marker", "among_answered"))
        gap = leak.get("source_minus_bystanders")
        out[f"{name}: answered rate; source rate; leakage ratio (bystander ÷ source); coupling (source − bystanders)"] = (
            f"{_est(leak.get('answered_rate'), _pct)}; {_est(leak.get('source_rate'), _pct)}; "
            f"{_est(leak.get('leakage_ratio'), _num('.2f'))}; {leak.get('coupling_verdict')}"
            + (f" ({_est(gap, _pp)})" if isinstance(gap, Mapping) else ""))
    for reading, label in (("all", "(a) all"), ("among_answered", "(c) among answered")):
        for c in CONTRASTS:
            e = _get(m, f"arm_effects.by_reading.{reading}.{c}")
            if e is None:
                continue
            name = " − ".join(ARM_LABEL.get(a, a) for a in c.split("-"))
            welch = e.get("adapter_welch") or {}
            out[f"arm effect {name}, {label}: mixed model; Welch on the arms' per-adapter rates (CIs across "
                f"adapters)"] = (f"{_pp(e['diff'])} [{_pp(e['ci_low'])}, {_pp(e['ci_high'])}]"
                                 + (f"; {_pp(welch['difference'])} [{_pp(welch['ci_low'])}, {_pp(welch['ci_high'])}]"
                                    if welch else ""))
    for d, label in (("em_minus_base_centroid", "EM − base centroid"),
                     ("diff_in_means_misaligned_aligned", "misaligned − aligned diff-in-means")):
        r = _get(m, f"reversal.{d}.in_domain") or {}
        if r:
            out[f"reversal, in-domain restoration: {label} (random-direction q95)"] = (
                f"{_est(r.get('restoration'), _pct)} ({_pct(r['random_null']['q95'])}); {r.get('verdict')}")
            if isinstance(r.get("capability_accuracy_drop"), Mapping):
                out[f"reversal, {label}: capability accuracy drop at the same scale (no random-direction control)"] = (
                    _est(r["capability_accuracy_drop"], _pp))
    out["runtime (s, this run's call; see text for cold)"] = f"{m.get('runtime_s')}"
    return out


def _label(name: str, m: Mapping[str, Any]) -> str:
    seeds = _get(m, "design.adapter_seeds")
    if not seeds:
        return f"{name}: 2026-11 code, one adapter per arm (not rerun)"
    return f"{name}: {len(seeds)} adapters per arm" + (", checks the method" if len(seeds) < 5 else ", the result")


def table() -> str:
    metrics = {name: json.loads(path.read_text()) for name, path in RUNS.items() if path.is_file()}
    columns = {_label(name, m): rows(m) for name, m in metrics.items()}
    measures = list(dict.fromkeys(k for col in columns.values() for k in col))
    lines = [BEGIN, "| measure | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    lines += ["| " + k + " | " + " | ".join(col.get(k, "—") for col in columns.values()) + " |" for k in measures]
    return "\n".join(lines + [END])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail when README.md does not hold the table")
    args = parser.parse_args(argv)
    text = table()
    if not args.check:
        print(text)
        return 0
    if text in (ROOT / "README.md").read_text():
        return 0
    print("README.md's 05b table differs from scripts/readme_05b.py's output: rerun it and paste", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
