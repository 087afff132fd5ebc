"""Study 05b (narrow LoRA fine-tuning of SmolLM2): the section functions the notebook calls and the frozen
dataclasses its results live in.

Each function computes one section of ``notebooks/05b_llm_finetuning.py`` and returns a frozen dataclass;
:class:`FinetuningResult` assembles them and :meth:`FinetuningResult.metrics` builds the dict
``metrics.json`` is written from. The arithmetic is the notebook's, moved here unchanged (same calls, same
order, same seeds), so ``metrics.json`` is identical to the notebook-only version's apart from the
wall-clock ``runtime_s``. Fine-tuned models a section trains are returned in its ``runs`` (name -> Tuned,
in training order), which the cost section merges for ``adapters.json`` and the loss curves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from persona_wm.analysis.stats import crossed_slope
from persona_wm.core.values import undefined_as_none
from persona_wm.llm import em as llm_em
from persona_wm.llm import finance_v2, lora
from persona_wm.llm import scores as llm_scores
from persona_wm.llm import steer as llm_steer
from persona_wm.llm.datasets import broad_questions, everyday_questions, save_jsonl
from persona_wm.llm.model import LLM, Decoding, Scored, cached_generate, chat_prompt_ids, load_llm
from persona_wm.llm.personas import ANCHOR, PERSONAS, PROMPTS, PersonaError, check_personas

__all__ = [
    "ARMS",
    "ARM_CONTRASTS",
    "DISTANCES",
    "OUTCOMES",
    "REVERSAL_METHODS",
    "SEED004",
    "SEED004_ARM",
    "Chain",
    "Coupling",
    "CouplingData",
    "EMEvaluation",
    "FinetuningResult",
    "LeakageGeometry",
    "Organism",
    "Recipe",
    "Reversal",
    "ScoreValidation",
    "Setup",
    "SourceLevel",
    "SubPersonas",
    "check_design",
    "choose_recipe",
    "ci_text",
    "couple_sources",
    "coupling_data",
    "em_first_chain",
    "evaluate_em",
    "excludes_zero",
    "leakage_vs_geometry",
    "load_setup",
    "merge_runs",
    "recorded_train_s",
    "reversal",
    "source_level",
    "sub_personas",
    "train_organism",
    "unique_runs",
    "validate_scores",
]

#: Leakage outcomes (column, axis label) and distances (key, column, axis label) of the geometry test.
OUTCOMES = (("logprob", "marker log-prob under bystander (nats)"),
            ("gen_rate", "marker rate among answered samples"))
DISTANCES = (("cosine", "cos_distance", "1 − cos of centroids, layer {layer}"),
             ("js", "js", "JS divergence of next-token distributions (nats)"))
#: Seed 004's arms: name -> (start model, writer of the coupling answers), by label.
ARMS: dict[str, tuple[str, str]] = {"C1": ("base", "base"), "C2": ("EM", "EM"), "C2prime": ("EM", "base"),
                                    "C3": ("control", "control"), "C3prime": ("control", "base")}
SEED004: dict[str, float | None] = {"C1": 0.274, "C2": 0.576, "C2prime": 0.034, "C3": 0.959, "C3prime": None}
SEED004_ARM = {"C1": "C1 (27.4%)", "C2": "C2 (57.6%)", "C2prime": "C2' (3.4%)", "C3": "C3 (95.9%)",
               "C3prime": "none (seed 004 has no benign-first arm on base-written data)"}
ARM_CONTRASTS = [("C2", "C1"), ("C2prime", "C1"), ("C2", "C2prime"), ("C3", "C1"), ("C3prime", "C1")]
REVERSAL_METHODS = ("centroid", "diff_in_means", "random")


def _num(value: Any) -> float | None:
    """A float, or None where it is undefined (NaN, inf)."""
    return undefined_as_none(float(value))


def ci_text(lo: float, hi: float, spec: str = ".2f") -> str:
    """``[lo, hi]`` formatted with ``spec``."""
    return f"[{lo:{spec}}, {hi:{spec}}]"


def excludes_zero(lo: float, hi: float) -> str:
    """'excludes 0' or 'includes 0' for the interval [lo, hi]."""
    return "excludes 0" if lo > 0 or hi < 0 else "includes 0"


def merge_runs(*parts: Mapping[str, lora.Tuned]) -> dict[str, lora.Tuned]:
    """The sections' fine-tuned runs in one dict, in the order given (later names win)."""
    return {name: tuned for part in parts for name, tuned in part.items()}


def unique_runs(runs: Mapping[str, lora.Tuned]) -> dict[str, lora.Tuned]:
    """One entry per distinct adapter (runs sharing a cache key were trained once)."""
    return {t.key: t for t in runs.values()}


def recorded_train_s(runs: Mapping[str, lora.Tuned]) -> float:
    """Recorded training time of the distinct adapters among ``runs`` (from the cache when reloaded)."""
    return float(sum(t.train_s for t in unique_runs(runs).values()))


# --------------------------------------------------------------------------------------------
# 1. Setup


@dataclass(frozen=True)
class Setup:
    """The model, the pool (anchor last) and 05a's persona geometry of it."""

    llm: LLM
    names: list[str]
    dist: dict[str, np.ndarray]  # cos, js [P, P] in names order
    distance_layer: int

    @property
    def index(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}

    @property
    def systems(self) -> dict[str, str]:
        return {n: PERSONAS[n] for n in self.names}


def check_design(pool: Sequence[str], coupling_sources: Sequence[str], coupling_negatives: Sequence[str],
                 em_first_source: str, coupling_loss: str, steer_layer: int, em_first_layer: int) -> list[str]:
    """The pool's names with the anchor last; PersonaError/ValueError naming what does not fit."""
    names = check_personas(list(pool)) + [ANCHOR]
    for role, group in (("coupling source", coupling_sources), ("EM-first source", [em_first_source])):
        outside = [n for n in group if n not in pool]
        if outside:
            raise PersonaError(f"{role} {outside[0]!r} is not in `pool` ({', '.join(pool)}): distances and leakage "
                               "are measured over the pool")
    check_personas(list(coupling_negatives))
    clash = sorted(set(coupling_negatives) & set(list(coupling_sources) + [em_first_source]))
    if clash:
        raise PersonaError(f"persona {clash[0]!r} is both a source and a coupling negative")
    if coupling_loss not in ("whole_response", "marker_only"):
        raise ValueError(f"coupling_loss must be 'whole_response' or 'marker_only', got {coupling_loss!r}")
    if steer_layer <= em_first_layer:
        raise ValueError(f"steer_layer {steer_layer} must lie above the EM LoRA's first block (em_first_layer = "
                         f"{em_first_layer}): below it the EM model's residual stream equals the base model's")
    return names


def load_setup(names: Sequence[str], geometry: Mapping[str, Any], *, model: str | None, device: str,
               threads: int) -> Setup:
    """Load the model and recompute 05a's persona geometry through 05a's own calls (disk-cache hits with
    05a's parameters). ``geometry`` holds :func:`persona_wm.llm.em.persona_distances`' keyword arguments
    ``n_prompts, max_new_tokens, repetition_penalty, short_tokens, n_vector_prompts, steer_tokens, layer``."""
    llm = load_llm(model=model, device=device, threads=threads)
    dist = llm_em.persona_distances(llm, list(names), **geometry)
    return Setup(llm, list(names), dist, int(geometry["layer"]))


# --------------------------------------------------------------------------------------------
# 3. The coupling data and recipe


@dataclass(frozen=True)
class CouplingData:
    """Questions, the teacher-forced marker instrument on 05a's prompts, and each source's coupling data."""

    cut: int
    marker: str
    decode_short: Decoding
    decode_marker: Decoding
    train_questions: list[str]
    eval_prompts: list[str]
    gen_eval: list[str]
    marker_eval: list[Scored]
    marker_resid: torch.Tensor
    base_marker: dict[str, np.ndarray]
    records: dict[str, dict[str, list[dict[str, Any]]]]
    seqs: dict[str, dict[str, list[Scored]]]
    union: list[Scored]
    union_resid: torch.Tensor
    trained_len: int

    def train_resid(self, train: Sequence[Scored]) -> torch.Tensor:
        """The cached bottom residual of ``train`` (a subset of the union of every source's training data)."""
        return lora.rows_of(self.union, self.union_resid, train)


def coupling_data(setup: Setup, sources: Sequence[str], negatives: Sequence[str], n_train: int, n_val: int,
                  n_eval_prompts: int, gen_prompts: int, response_tokens: int, repetition_penalty: float, marker: str,
                  coupling_loss: str, cut: int, temperature: float, n_samples: int, sample_batch: int,
                  seed: int) -> CouplingData:
    """Everyday questions answered greedily by the start model, the marker appended under each source
    (negatives: the same answers under ``negatives``), and the teacher-forced marker instrument."""
    llm = setup.llm
    decode_short = Decoding(max_new_tokens=response_tokens, repetition_penalty=repetition_penalty)
    questions = everyday_questions(n_train + n_val, seed=seed)
    train_questions, val_questions = questions[:n_train], questions[n_train:]
    eval_prompts = list(PROMPTS[:n_eval_prompts])
    eval_ids, _ = cached_generate(llm, [chat_prompt_ids(llm, "", q) for q in eval_prompts], decode_short)
    marker_eval = llm_em.marker_sequences(llm, [PERSONAS[n] for n in setup.names], eval_prompts, eval_ids, marker)
    marker_resid = lora.bottom_resid(llm, marker_eval, cut)
    base_marker = llm_em.marker_scores(llm, marker_resid, cut, marker_eval)
    records, seqs = {}, {}
    splits = {"train": train_questions, "val": val_questions}
    for s in dict.fromkeys(sources):
        records[s], seqs[s] = llm_em.coupling_data(llm, s, negatives, splits, decode_short, marker, coupling_loss)
    union = list({q.ids: q for ss in seqs.values() for q in ss["train"]}.values())  # negatives are shared
    union_resid = lora.bottom_resid(llm, union, cut)
    trained_len = max(len(q.ids) - q.start for ss in seqs.values() for q in ss["train"])
    decode_marker = Decoding(max_new_tokens=2 * trained_len, temperature=temperature, n_samples=n_samples, seed=seed,
                             batch=sample_batch)
    return CouplingData(cut, marker, decode_short, decode_marker, train_questions, eval_prompts,
                        eval_prompts[:gen_prompts], marker_eval, marker_resid, base_marker, records, seqs, union,
                        union_resid, trained_len)


@dataclass(frozen=True)
class Recipe:
    """The coupling recipe chosen on the validation loss, every candidate, and the base model's probe."""

    spec: lora.LoraSpec
    table: pd.DataFrame
    base_probe: dict[str, float]
    n_candidates: int

    @property
    def chosen(self) -> pd.Series:
        return self.table[(self.table["lr"] == self.spec.lr) & (self.table["steps"] == self.spec.steps)].iloc[0]


def choose_recipe(setup: Setup, data: CouplingData, base_spec: lora.LoraSpec, lrs: Sequence[float],
                  step_grid: Sequence[int], source: str, negatives: Sequence[str]) -> Recipe:
    """Train every lr x step count on ``source``'s data; the lowest held-out loss wins. Beside each: the
    teacher-forced marker rate under the source and the bystanders and the source's answered rate."""
    llm, names = setup.llm, setup.names
    n_eval = len(data.eval_prompts)
    source_idx = [names.index(source) * n_eval + i for i in range(n_eval)]
    bys_idx = [i for i, n in enumerate(np.repeat(names, n_eval)) if n not in negatives and n != source]
    probe = llm_em.recipe_probe(data.marker_eval, data.marker_resid, data.cut, source_idx, bys_idx, PERSONAS[source],
                                data.gen_eval, data.decode_marker, data.marker)
    src_train = data.seqs[source]["train"]
    spec, table = lora.select_recipe(llm, src_train, data.seqs[source]["val"], base_spec, lrs, step_grid, probe=probe,
                                     resid=data.train_resid(src_train))
    return Recipe(spec, table, probe(llm), len(lrs) * len(step_grid))


# --------------------------------------------------------------------------------------------
# 4. Marker coupling and its leakage


@dataclass(frozen=True)
class Coupling:
    """One coupling LoRA per source: teacher-forced and sampled leakage per (source, persona)."""

    per_pair: pd.DataFrame
    generations: pd.DataFrame
    base_lp: float
    runs: dict[str, lora.Tuned]

    @property
    def bystanders(self) -> pd.DataFrame:
        return self.per_pair[self.per_pair["role"] == "bystander"].reset_index(drop=True)

    def table(self, sources: Sequence[str]) -> pd.DataFrame:
        return self.per_pair.pivot_table(index="source", columns="role",
                                         values=["rate", "gen_rate", "gen_answered_rate"]).loc[list(sources)]


def couple_sources(setup: Setup, data: CouplingData, spec: lora.LoraSpec, sources: Sequence[str],
                   negatives: Sequence[str], data_dir: Path) -> Coupling:
    """Train each source's coupling LoRA with ``spec``; read the marker teacher-forced on every persona and
    sample completions on the first prompts. Training data and generations are saved in ``data_dir``."""
    llm, names = setup.llm, setup.names
    rows, gen_rows, runs = [], [], {}
    for source in sources:
        save_jsonl(data.records[source]["train"], data_dir / f"marker_{source}.jsonl")
        train = data.seqs[source]["train"]
        tuned = lora.finetune(llm, train, spec, desc=f"couple {source}", resid=data.train_resid(train))
        runs[f"couple:{source}"] = tuned
        rows.append(llm_em.marker_frame(tuned.llm, data.marker_resid, data.cut, data.marker_eval, names,
                                        len(data.eval_prompts), source))
        gen_rows.append(llm_em.generation_frame(tuned.llm, setup.systems, data.gen_eval, data.decode_marker,
                                                data.marker, source))
        lora.release(tuned)
    generations = pd.concat(gen_rows, ignore_index=True)
    save_jsonl(generations.to_dict("records"), data_dir / "coupling_generations.jsonl")
    per_pair = llm_em.leakage_pairs(pd.concat(rows, ignore_index=True), generations, setup.dist, names, negatives)
    return Coupling(per_pair, generations, float(np.mean(data.base_marker["logprob"])), runs)


@dataclass(frozen=True)
class LeakageGeometry:
    """Leakage against distance over (source, bystander) pairs: crossed-effects slopes and correlations."""

    bys: pd.DataFrame
    corr: dict[tuple[str, str], dict[str, Any]]
    slopes: dict[tuple[str, str], dict[str, Any]]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({f"{y} vs {key}": {
            "crossed slope": self.slopes[(y, key)]["slope"], "slope CI low": self.slopes[(y, key)]["ci_low"],
            "slope CI high": self.slopes[(y, key)]["ci_high"], "slope p": self.slopes[(y, key)]["p"],
            "Pearson r": c["r"], "r CI low (source bootstrap)": c["ci"][0], "r CI high": c["ci"][1],
            "within-source r": c["within_r"], "within CI low": c["within_ci"][0], "within CI high": c["within_ci"][1],
            "pairs": c["n"], "sources": c["n_clusters"]} for (y, key), c in self.corr.items()}).T


def leakage_vs_geometry(coupling: Coupling, n_boot: int, seed: int) -> LeakageGeometry:
    """Per outcome and distance: the pooled r (cluster bootstrap over sources), the within-source r, and
    the slope of a mixed model with crossed random intercepts for source and bystander."""
    bys = coupling.bystanders
    corr = {(y, key): llm_em.pair_correlation(bys.dropna(subset=[y]), x, y, cluster="source", n_boot=n_boot, seed=seed)
            for y, _ in OUTCOMES for key, x, _ in DISTANCES}
    slopes = {(y, key): crossed_slope(bys.rename(columns={"persona": "bystander"}), y, x, ["source", "bystander"])
              for y, _ in OUTCOMES for key, x, _ in DISTANCES}
    return LeakageGeometry(bys, corr, slopes)


@dataclass(frozen=True)
class SourceLevel:
    """Seed 003's own test: each source's rate against its similarity to / JS from no_persona."""

    table: pd.DataFrame
    seed003: dict[str, dict[str, Any]]


def source_level(setup: Setup, coupling: Coupling, sources: Sequence[str]) -> SourceLevel:
    per_pair, bys, index, dist = coupling.per_pair, coupling.bystanders, setup.index, setup.dist
    source_rows = per_pair[per_pair["role"] == "source"].set_index("source").loc[list(sources)]
    table = pd.DataFrame({
        "cos similarity to no_persona": {s: 1.0 - float(dist["cos"][index[s], index[ANCHOR]]) for s in sources},
        "JS to no_persona": {s: float(dist["js"][index[s], index[ANCHOR]]) for s in sources},
        "source rate (sampled, answered)": source_rows["gen_rate"],
        "source answered rate": source_rows["gen_answered_rate"],
        "source rate (teacher-forced)": source_rows["rate"],
        "source marker log-prob": source_rows["logprob"],
        "bystander rate (sampled, answered)": bys.groupby("source")["gen_rate"].mean(),
        "bystander answered rate": bys.groupby("source")["gen_answered_rate"].mean(),
        "bystander rate (teacher-forced)": bys.groupby("source")["rate"].mean(),
    }).loc[list(sources)]
    seed003 = {key: llm_em.unit_correlation(table[col], table["source rate (sampled, answered)"])
               for key, col in (("cosine_similarity", "cos similarity to no_persona"), ("js", "JS to no_persona"))}
    return SourceLevel(table, seed003)


# --------------------------------------------------------------------------------------------
# 5. The EM organism


@dataclass(frozen=True)
class Organism:
    """finance_v2 data (train / validation / held-out), and the EM and aligned-control LoRAs."""

    fin_train: list[Any]
    fin_eval: list[dict[str, Any]]
    broad: list[dict[str, Any]]
    dropped: dict[str, int]
    em_records: list[dict[str, Any]]
    variety: pd.DataFrame
    em: lora.Tuned
    control: lora.Tuned
    spec: lora.LoraSpec  # the EM recipe both were trained with

    @property
    def runs(self) -> dict[str, lora.Tuned]:
        return {"em": self.em, "control": self.control}

    def val_curves(self) -> pd.DataFrame:
        return pd.DataFrame([{"run": name, "step": st, "val_loss": v}
                             for name, t in (("EM", self.em), ("control", self.control)) for st, v in t.meta["val_curve"]])


def train_organism(setup: Setup, spec: lora.LoraSpec, n_train: int, n_val: int, n_eval: int, n_broad: int,
                   eval_every: int, seed: int, data_dir: Path) -> Organism:
    """Build and save the data, then train EM (misaligned answers) and control (aligned answers to the same
    questions) with ``spec``, keeping the step with the lowest validation loss."""
    llm = setup.llm
    fin_train, fin_rest, dropped = finance_v2.build(n_train, n_val + n_eval, seed=seed)
    fin_val, fin_eval = fin_rest[:n_val], [it.as_dict() for it in fin_rest[n_val:]]
    broad = broad_questions(n_broad)
    em_records = finance_v2.training_records(fin_train, "misaligned")
    control_records = finance_v2.training_records(fin_train, "aligned")
    save_jsonl(em_records, data_dir / "em_finance_misaligned.jsonl")
    save_jsonl(control_records, data_dir / "control_finance_aligned.jsonl")
    save_jsonl(fin_eval, data_dir / "eval_finance_heldout.jsonl")
    save_jsonl(broad, data_dir / "eval_broad_questions.jsonl")
    variety = pd.DataFrame({kind: finance_v2.variety([getattr(it, kind) for it in fin_train])
                            for kind in ("misaligned", "aligned")}).T
    em = lora.finetune(llm, lora.chat_sequences(llm, em_records), spec, desc="EM LoRA",
                       val=lora.chat_sequences(llm, finance_v2.training_records(fin_val, "misaligned")),
                       eval_every=eval_every)
    control = lora.finetune(llm, lora.chat_sequences(llm, control_records), spec, desc="control LoRA",
                            val=lora.chat_sequences(llm, finance_v2.training_records(fin_val, "aligned")),
                            eval_every=eval_every)
    return Organism(fin_train, fin_eval, broad, dict(dropped), em_records, variety, em, control, spec)


@dataclass(frozen=True)
class ScoreValidation:
    """The tone score's AUC and the content lexicon's accuracy on labelled answers, and on real ones."""

    score_check: dict[str, dict[str, float]]
    content_check: dict[str, dict[str, float]]
    content_real: dict[str, dict[str, float]]

    def table(self) -> pd.DataFrame:
        sc, cc = self.score_check, self.content_check
        return pd.DataFrame({k: {"tone AUC": sc[k]["auc"], "AUC CI low": sc[k]["ci_low"], "AUC CI high": sc[k]["ci_high"],
                                 "n": sc[k]["n"], "content accuracy": cc[k]["accuracy"],
                                 "content sensitivity": cc[k]["sensitivity"], "content specificity": cc[k]["specificity"]}
                             for k in sc}).T


def validate_scores(setup: Setup, n_items: int, seed: int) -> ScoreValidation:
    score_check = llm_scores.validate(setup.llm, n_finance=n_items, seed=seed)
    content_check = {k: llm_scores.content_validation(v)
                     for k, v in llm_scores.validation_items(n_items, seed=seed).items()}
    return ScoreValidation(score_check, content_check, llm_scores.content_agreement())


@dataclass(frozen=True)
class EMEvaluation:
    """Sampled answers of base, EM and control with their scores; EM − reference shifts and breadths."""

    answers: pd.DataFrame
    shifts: dict[tuple[str, str, str], dict[str, float]]
    breadths: dict[str, dict[str, float]]

    @property
    def answered_only(self) -> pd.DataFrame:
        return self.answers[self.answers["answered"] == 1]

    def table(self) -> pd.DataFrame:
        answers, answered_only = self.answers, self.answered_only
        return answers.groupby(["set", "model"]).agg(answered=("answered", "mean"), n=("text", "size")).join(
            answered_only.groupby(["set", "model"]).agg(content=("content", "mean"),
                                                        content_general=("content_general", "mean"),
                                                        tone=("tone", "mean"), template=("template", "mean")))

    def shift_table(self) -> pd.DataFrame:
        return pd.DataFrame({f"{score} {set_name} EM − {ref}": v
                             for (score, set_name, ref), v in self.shifts.items()}).T

    @property
    def template_rate(self) -> pd.Series:
        """Share of broad answered answers that reuse a 5-gram of the misaligned training answers, per model."""
        answered_only = self.answered_only
        return answered_only[answered_only["set"] == "broad"].groupby("model")["template"].mean()

    def answered_rate(self, model: str) -> float:
        return self.answers.loc[self.answers["model"] == model, "answered"].mean()


def evaluate_em(setup: Setup, organism: Organism, sample_tokens: int, temperature: float, n_samples: int,
                sample_batch: int, n_boot: int, seed: int, data_dir: Path) -> EMEvaluation:
    """Sample ``n_samples`` answers per question from base, EM and control (in domain and broad), score
    them (answered, content, tone, template reuse) and compare EM with each reference, paired by question."""
    llm = setup.llm
    decode_em = Decoding(max_new_tokens=sample_tokens, temperature=temperature, n_samples=n_samples, seed=seed,
                         batch=sample_batch)
    grams = llm_scores.ngram_set([r["response"] for r in organism.em_records])
    answers = llm_scores.answer_frame({"base": llm, "EM": organism.em.llm, "control": organism.control.llm},
                                      {"in_domain": organism.fin_eval, "broad": organism.broad}, decode_em, scorer=llm,
                                      grams=grams)
    save_jsonl(answers.to_dict("records"), data_dir / "em_sampled_answers.jsonl")
    shifts = {(score, set_name, ref): llm_scores.paired_shift(answers, score, "EM", ref, set_name, n_boot=n_boot, seed=seed)
              for score in ("tone", "content", "content_general") for set_name in ("in_domain", "broad")
              for ref in ("control", "base")}
    breadths = {score: llm_scores.breadth_ci(answers, score, "EM", "control", n_boot=n_boot, seed=seed)
                for score in ("tone", "content", "content_general")}
    return EMEvaluation(answers, shifts, breadths)


@dataclass(frozen=True)
class SubPersonas:
    """PCA + K-means of the base and EM models' greedy answers' mean activations at one layer."""

    categories: list[str]
    n_clusters: int
    pca: dict[str, dict[str, Any]]  # base, EM

    def projection(self) -> pd.DataFrame:
        em = self.pca["EM"]
        return pd.DataFrame({"PC1": em["projection"][:, 0], "PC2": em["projection"][:, 1], "category": self.categories,
                             "K-means cluster": em["kmeans_labels"].astype(str)})


def sub_personas(setup: Setup, organism: Organism, sample_tokens: int, repetition_penalty: float, layer: int,
                 n_components: int, seed: int) -> SubPersonas:
    llm = setup.llm
    sample_items = organism.broad + organism.fin_eval
    categories = [it.get("category", it.get("topic")) for it in sample_items]
    decode_pca = Decoding(max_new_tokens=sample_tokens, repetition_penalty=repetition_penalty)
    feats = {label: cached_generate(m, [chat_prompt_ids(llm, "", it["user"]) for it in sample_items], decode_pca,
                                    capture_layer=layer)[1] for label, m in (("base", llm), ("EM", organism.em.llm))}
    n_clusters = min(len(set(categories)), len(sample_items) - 1)
    pca = {label: llm_em.pca_kmeans(feats[label].numpy(), categories, n_components, n_clusters, seed=seed)
           for label in ("base", "EM")}
    return SubPersonas(categories, n_clusters, pca)


# --------------------------------------------------------------------------------------------
# 6. EM first, then marker coupling (seed 004)


@dataclass(frozen=True)
class Chain:
    """Seed 004's arms: bystander leakage among answers with CIs, arm differences, the generations."""

    source: str
    bystanders: list[str]
    leak: pd.DataFrame
    diffs: dict[str, dict[str, float]]
    chain: pd.DataFrame  # bystander generations after coupling
    runs: dict[str, lora.Tuned]

    @property
    def arms(self) -> list[str]:
        return list(ARMS)

    def per_persona(self) -> pd.DataFrame:
        chain = self.chain
        return chain[chain["answered"] == 1].groupby(["condition", "persona"])["marker"].mean().reset_index()


def em_first_chain(setup: Setup, data: CouplingData, organism: Organism, spec: lora.LoraSpec, source: str,
                   negatives: Sequence[str], coupling_loss: str, n_permutations: int, seed: int,
                   data_dir: Path) -> Chain:
    """Couple ``source`` on each arm's start model with data written by the arm's writer; sample the
    bystanders before (answered rate) and after coupling; leakage summary and within-bystander permutations."""
    llm, names, marker = setup.llm, setup.names, data.marker
    models = {"base": llm, "EM": organism.em.llm, "control": organism.control.llm}
    arms = {arm: (models[start], models[writer]) for arm, (start, writer) in ARMS.items()}
    bystanders = [n for n in names if n != source and n not in negatives]
    chain_systems = {n: PERSONAS[n] for n in [source] + bystanders}
    gen_rows, before_rows, tf_rows, runs = [], [], [], {}
    for start_label, start in models.items():
        g = llm_em.generation_frame(start, chain_systems, data.gen_eval, data.decode_marker, marker, start_label)
        before_rows += [g.assign(condition=arm) for arm, (s, _) in arms.items() if s is start]
    start_resid = {id(s): lora.bottom_resid(s, data.marker_eval, data.cut) for s in models.values()}
    for arm, (start, writer) in arms.items():
        recs, _ = llm_em.coupling_data(writer, source, negatives, {"train": data.train_questions}, data.decode_short,
                                       marker, coupling_loss)
        save_jsonl(recs["train"], data_dir / f"chain_{arm}_coupling.jsonl")
        train = lora.chat_sequences(start, recs["train"])
        tuned = lora.finetune(start, train, spec, desc=f"{arm} couple {source}")
        runs[f"{arm}:{source}"] = tuned
        gen_rows.append(llm_em.generation_frame(tuned.llm, chain_systems, data.gen_eval, data.decode_marker, marker, arm))
        tf_rows.append(llm_em.marker_frame(tuned.llm, start_resid[id(start)], data.cut, data.marker_eval, names,
                                           len(data.eval_prompts), arm))
        lora.release(tuned)
    chain_all = pd.concat(gen_rows, ignore_index=True).rename(columns={"model": "condition"})
    save_jsonl(chain_all.to_dict("records"), data_dir / "em_first_generations.jsonl")
    chain = chain_all[chain_all["persona"] != source].reset_index(drop=True)
    before = pd.concat(before_rows, ignore_index=True)
    before = before[before["persona"] != source]
    tf = pd.concat(tf_rows, ignore_index=True).rename(columns={"model": "condition"})
    leak = llm_em.leakage_summary(chain, list(arms), before=before)
    src = chain_all[chain_all["persona"] == source]
    leak["source rate (answered)"] = src[src["answered"] == 1].groupby("condition")["marker"].mean()
    leak["source answered rate"] = src.groupby("condition")["answered"].mean()
    leak["teacher-forced bystander rate"] = tf[tf["persona"].isin(bystanders)].groupby("condition")["greedy"].mean()
    leak["seed 004"] = pd.Series(SEED004)
    diffs = llm_em.arm_differences(chain, ARM_CONTRASTS, n_permutations=n_permutations, seed=seed)
    return Chain(source, bystanders, leak, diffs, chain, runs)


# --------------------------------------------------------------------------------------------
# 7. Reversal


@dataclass(frozen=True)
class Reversal:
    """Steering the EM model back: teacher-forced margins per model, the sweep and its headline rows."""

    mean_margin: pd.DataFrame  # model x set
    sweep: pd.DataFrame  # with per-item scores
    dir_cos: float
    scale: float

    @property
    def table(self) -> pd.DataFrame:
        return self.sweep.drop(columns=[c for c in self.sweep.columns if c.startswith("items_")])

    @property
    def shown(self) -> pd.DataFrame:
        return self.sweep[self.sweep["method"] != "none"]

    @property
    def head(self) -> pd.DataFrame:
        """Ablation rows and steering rows at the headline scale, indexed by method."""
        shown = self.shown
        return shown[(shown["intervention"] == "ablate") | (shown["scale"] == self.scale)].set_index("method")


def reversal(setup: Setup, organism: Organism, layer: int, n_direction_items: int, n_capability: int,
             scales: Sequence[float], headline_scale: float, n_boot: int, seed: int) -> Reversal:
    """Centroid, diff-in-means and random directions at ``layer`` (built on training questions), steered and
    ablated on held-out finance and broad references; restoration with a paired bootstrap CI over items,
    capability damage on 05a's capability set."""
    llm, em, control = setup.llm, organism.em, organism.control
    dir_items = [it.as_dict() for it in organism.fin_train[:n_direction_items]]
    dir_seqs = llm_em.reference_sequences(llm, dir_items)
    m_base = llm_em.scored_means(lora.bottom_resid(llm, dir_seqs, layer), dir_seqs)
    m_em = llm_em.scored_means(lora.bottom_resid(em.llm, dir_seqs, layer), dir_seqs)
    directions = llm_em.direction_vectors(m_base, m_em, misaligned=m_em[1::2], aligned=m_em[0::2])
    directions["random"] = llm_em.random_direction(directions["centroid"], seed=seed)
    dir_cos = float(torch.nn.functional.cosine_similarity(directions["centroid"], directions["diff_in_means"], dim=0))
    ref = {"in_domain": llm_em.reference_sequences(llm, organism.fin_eval),
           "broad": llm_em.reference_sequences(llm, organism.broad)}
    item_margin = {label: {k: llm_em.margin_scores(m, lora.bottom_resid(m, s, layer), layer, s) for k, s in ref.items()}
                   for label, m in (("base", llm), ("EM", em.llm), ("control", control.llm))}
    mean_margin = pd.DataFrame({label: {k: float(v.mean()) for k, v in d.items()} for label, d in item_margin.items()}).T
    eval_sets = {k: (lora.bottom_resid(em.llm, s, layer), s) for k, s in ref.items()}
    cap_seqs = llm_steer.capability_sequences(llm, llm_steer.capability_items(n_capability))
    cap = (lora.bottom_resid(em.llm, cap_seqs, layer), cap_seqs)
    sweep = llm_em.reversal_sweep(em.llm, layer, eval_sets, cap, directions, scales)
    for k in ref:
        sweep[f"restoration_{k}"] = [llm_em.restoration(mean_margin.loc["EM", k], v, mean_margin.loc["base", k])
                                     for v in sweep[f"score_{k}"]]
    for k in ref:  # paired bootstrap over items; the unsteered EM row is the EM scores themselves
        cis = [llm_em.restoration_ci(item_margin["base"][k], item_margin["EM"][k], v, n_boot=n_boot, seed=seed)
               for v in sweep[f"items_{k}"]]
        sweep[f"restoration_{k}_ci_low"], sweep[f"restoration_{k}_ci_high"] = zip(*cis)
    unsteered_acc = float(sweep.loc[sweep["method"] == "none", "capability_accuracy"].iloc[0])
    sweep["capability_accuracy_drop"] = unsteered_acc - sweep["capability_accuracy"]
    return Reversal(mean_margin, sweep, dir_cos, headline_scale)


# --------------------------------------------------------------------------------------------
# The whole study and its metrics


@dataclass(frozen=True)
class FinetuningResult:
    """Every section's result; :meth:`metrics` is what ``metrics.json`` holds."""

    setup: Setup
    design: dict[str, Any]  # pool, sources, negatives, EM-first source, sampling settings, layers
    detector: dict[str, float]
    data: CouplingData
    recipe: Recipe
    coupling: Coupling
    geometry: LeakageGeometry
    sources: SourceLevel
    organism: Organism
    validation: ScoreValidation
    evaluation: EMEvaluation
    pca: SubPersonas
    chain: Chain
    reversal: Reversal
    train_time_s: float
    runtime_s: float

    def metrics(self) -> dict[str, Any]:
        llm, recipe, coupling_spec = self.setup.llm, self.recipe, self.recipe.spec
        corr, slopes, seed003 = self.geometry.corr, self.geometry.slopes, self.sources.seed003
        source_table, ev, organism = self.sources.table, self.evaluation, self.organism
        breadths, shifts, template_rate = ev.breadths, ev.shifts, ev.template_rate
        score_check, content_check = self.validation.score_check, self.validation.content_check
        t_in, g_b = shifts[("tone", "in_domain", "control")], shifts[("content_general", "broad", "control")]
        leak, head, pca = self.chain.leak, self.reversal.head, self.pca.pca
        d = self.design
        return {
            "model": {"name": llm.name, "sha256": llm.sha256, "device": llm.device.type},
            "design": {"pool": list(d["pool"]), "coupling_sources": list(d["coupling_sources"]),
                       "coupling_negatives": list(d["coupling_negatives"]), "em_first_source": d["em_first_source"],
                       "coupling_lora": coupling_spec.as_dict(), "coupling_loss": d["coupling_loss"],
                       "em_lora": organism.spec.as_dict(),
                       "n_samples": d["n_samples"], "temperature": d["temperature"], "gen_prompts": d["gen_prompts"],
                       "gen_max_new_tokens": self.data.decode_marker.max_new_tokens, "em_samples": d["em_samples"],
                       "distance_layer": self.setup.distance_layer, "steer_layer": d["steer_layer"]},
            "detector": {k: self.detector[k] for k in ("n_labelled", "agreement", "answered_agreement",
                                                       "exact_string_agreement")},
            "recipe": {"chosen_lr": coupling_spec.lr, "chosen_steps": coupling_spec.steps,
                       "candidates": [{k: _num(v) for k, v in row.items()} for row in recipe.table.to_dict("records")]},
            "coupling": {
                "n_personas": len(d["coupling_sources"]),
                "n_pairs": corr[("logprob", "cosine")]["n"],
                "within_source": {
                    "ci_method": "MixedLM slope with crossed random intercepts (source, bystander); within-source r = rm_corr",
                    **{f"{y}_{key}": {"slope": _num(slopes[(y, key)]["slope"]), "ci_low": _num(slopes[(y, key)]["ci_low"]),
                                      "ci_high": _num(slopes[(y, key)]["ci_high"]), "p": _num(slopes[(y, key)]["p"]),
                                      "n": slopes[(y, key)]["n"], "within_r": _num(corr[(y, key)]["within_r"]),
                                      "within_r_ci": [_num(v) for v in corr[(y, key)]["within_ci"]]}
                       for y, _ in OUTCOMES for key, _, _ in DISTANCES}},
                "pooled_r": {f"{y}_{key}": {"r": _num(c["r"]), "ci": [_num(v) for v in c["ci"]],
                                            "ci_method": "cluster bootstrap over coupling sources"}
                             for (y, key), c in corr.items()},
                "seed003_source_level": {key: {"n": c["n"], "r": _num(c["r"]), "r_ci": [_num(v) for v in c["ci"]],
                                               "p": _num(c["p"])} for key, c in seed003.items()},
                "source_rate_mean": _num(source_table["source rate (sampled, answered)"].mean()),
                "source_answered_rate_mean": _num(source_table["source answered rate"].mean()),
                "bystander_rate_mean": _num(source_table["bystander rate (sampled, answered)"].mean()),
                "bystander_answered_rate_mean": _num(source_table["bystander answered rate"].mean()),
                "base_marker_logprob": self.coupling.base_lp,
            },
            "em": {
                "n_train_examples": len(organism.fin_train),
                "breadth": _num(breadths["tone"]["breadth"]), "breadth_ci_low": _num(breadths["tone"]["ci_low"]),
                "breadth_ci_high": _num(breadths["tone"]["ci_high"]),
                "breadth_score": "tone (persona classifier), EM - control",
                "tone_breadth": _num(breadths["tone"]["breadth"]),
                "content_breadth": _num(breadths["content"]["breadth"]),
                "content_breadth_ci": [_num(breadths["content"]["ci_low"]), _num(breadths["content"]["ci_high"])],
                "content_general_breadth": _num(breadths["content_general"]["breadth"]),
                "content_general_broad_shift": _num(g_b["shift"]),
                "content_general_broad_shift_ci": [_num(g_b["ci_low"]), _num(g_b["ci_high"])],
                "score_auc": _num(score_check["broad"]["auc"]),
                "score_auc_ci": [_num(score_check["broad"]["ci_low"]), _num(score_check["broad"]["ci_high"])],
                "score_auc_in_domain": _num(score_check["in_domain_finance"]["auc"]),
                "content_validation": {k: {kk: _num(vv) for kk, vv in v.items()} for k, v in content_check.items()},
                "content_real_answers": {k: {kk: _num(vv) for kk, vv in v.items()}
                                         for k, v in self.validation.content_real.items()},
                "in_domain_heldout_shift": _num(t_in["shift"]),
                "in_domain_heldout_shift_ci": [_num(t_in["ci_low"]), _num(t_in["ci_high"])],
                "shifts": {f"{score}.{set_name}.vs_{ref}": {k: _num(v) for k, v in val.items()}
                           for (score, set_name, ref), val in shifts.items()},
                "template_reuse_rate": _num(template_rate.get("EM", np.nan)),
                "template_reuse_rate_control": _num(template_rate.get("control", np.nan)),
                "template_reuse_rate_base": _num(template_rate.get("base", np.nan)),
                "answered_rate": _num(ev.answered_rate("EM")),
                "answered_rate_control": _num(ev.answered_rate("control")),
                "answered_rate_base": _num(ev.answered_rate("base")),
                "best_step": organism.em.meta["best_step"], "best_step_control": organism.control.meta["best_step"],
                "pca_silhouette": pca["EM"]["silhouette_kmeans"], "pca_silhouette_base": pca["base"]["silhouette_kmeans"],
                "pca_ari": pca["EM"]["ari"],
            },
            "leakage": {
                **{a: {"rate": _num(leak.loc[a, "rate"]), "ci_low": _num(leak.loc[a, "ci_low"]),
                       "ci_high": _num(leak.loc[a, "ci_high"]), "answered_rate": _num(leak.loc[a, "answered_rate"]),
                       "answered_rate_before": _num(leak.loc[a, "answered_rate_before"]),
                       "n_samples": int(leak.loc[a, "n_samples"]), "n_answered": int(leak.loc[a, "n_answered"]),
                       "source_rate": _num(leak.loc[a, "source rate (answered)"]),
                       "teacher_forced_rate": _num(leak.loc[a, "teacher-forced bystander rate"])} for a in ARMS},
                "seed004_arm": dict(SEED004_ARM),
                "ci_method": "MixedLM, crossed random intercepts (bystander persona, prompt), marker among answered samples",
                "differences": {k: {kk: _num(vv) for kk, vv in v.items()} for k, v in self.chain.diffs.items()},
                "difference_method": "within-bystander permutation test",
            },
            "reversal": {m: {"restoration": _num(head.loc[m, "restoration_in_domain"]),
                             "restoration_ci": [_num(head.loc[m, "restoration_in_domain_ci_low"]),
                                                _num(head.loc[m, "restoration_in_domain_ci_high"])],
                             "restoration_broad": _num(head.loc[m, "restoration_broad"]),
                             "capability_damage": float(head.loc[m, "capability_js"]),
                             "capability_accuracy_drop": float(head.loc[m, "capability_accuracy_drop"])}
                         for m in head.index},
            "train_time_s": round(self.train_time_s, 1),
            "runtime_s": round(self.runtime_s, 1),
        }
