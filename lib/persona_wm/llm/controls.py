"""Controls for study 05a: could the representation-behaviour agreement arise without personas?

Seed 001's agreement (Spearman rho between 1 - cos of per-persona residual means and the JS
divergence of per-persona next-token distributions) reads both geometries from the *same*
teacher-forced pass at the *same* positions, so any system-prompt difference that moves late-layer
activations also moves the logits computed from them. A number is a finding only beside the
controls that could produce it without the phenomenon:

* **length-matched non-persona system prompts** (:func:`length_matched_controls`): formatting and
  topic instructions with exactly the token count of each persona prompt, through the same
  pipeline. If their rho is as high, the agreement is a property of "different system prompts",
  not of personas.
* **random weights** (:func:`random_weights_llm`): the same architecture re-initialised (HF's own
  initialiser, seeded) or with every weight matrix's entries shuffled (same per-matrix
  distribution, no learned structure), fed the same tokens. Whatever rho survives here is
  mechanical: the unembedding of a random network still turns residual differences into output
  differences.
* **system-token representations** (:func:`system_token_means`): centroids read from the system
  prompt's own tokens (before the user turn and the response), against the same JS; this
  separates "the persona is represented" from "the response positions carry it".
* **mean-centred cosine** is computed by :func:`persona_wm.analysis.geometry.layer_statistics` (``centred_rho``).

Uncertainty: prompts are the replication unit (centroids and JS are averages over prompts), so
:func:`bootstrap_rho` resamples prompts (scipy's BCa bootstrap), with the same draws for every
condition so that the difference between two conditions' rho has a paired CI.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from persona_wm.analysis.geometry import cosine_distance_matrix, rsa
from persona_wm.llm.model import (
    LLM,
    LLMError,
    chat_prompt_ids,
    forward,
    scored_sequence,
)
from persona_wm.llm.steer import PersonaTargets, llm_steering_sweep, select_targets

__all__ = [
    "CONTROL_POOL",
    "TOPIC_POOLS",
    "CONTROL_SETS",
    "length_matched_controls",
    "topic_matched_controls",
    "system_token_means",
    "random_weights_llm",
    "rho_by_layer",
    "bootstrap_rho",
    "random_directions",
    "matched_effect_scales",
    "describe_control",
    "matched_effect_sweep",
    "verdict",
]

#: Formatting and topic instructions with no identity, occupation or character in them.
CONTROL_POOL: tuple[str, ...] = (
    "Answer in complete sentences and keep each paragraph short.",
    "Use plain words and avoid jargon wherever you can.",
    "Put the most important point first, then the details.",
    "Write numbers as digits and spell out every abbreviation once.",
    "When a list helps, use a numbered list with one item per line.",
    "Keep the answer under one hundred words unless asked for more.",
    "Use British spelling throughout the answer.",
    "End the answer with a one-line summary.",
    "Do not use bold text, headings or emoji.",
    "If the question is about food, mention seasonal ingredients.",
    "If the question is about travel, mention the weather in spring.",
    "Prefer the active voice and short verbs.",
    "Give one concrete example for every general claim.",
    "Separate the steps of any procedure with blank lines.",
    "Round any measurement to two significant figures.",
    "Mention units next to every quantity you give.",
    "Quote dates in the day month year order.",
    "Use second person when giving instructions.",
    "Avoid rhetorical questions in the answer.",
    "Write times of day in the twenty-four hour format.",
)


#: Topic-matched non-persona system prompts: for each persona, sentences about its subject matter with no
#: identity, occupation or character ("you are ..." never appears, nor the occupation's name), so a
#: persona and its topic control share vocabulary and domain and differ in who speaks.
TOPIC_POOLS: dict[str, tuple[str, ...]] = {
    "cybersec_consultant": ("Computer networks, passwords, firewalls and encrypted data may come up.",
                            "Phishing emails and attacks on company systems are common topics.",
                            "Backups and software updates protect stored information."),
    "pentester": ("Security tests of company systems, weak passwords and unpatched servers may come up.",
                  "Reports list the weaknesses found in a network.", "Locks, logins and access rights matter."),
    "software_engineer": ("Source code, code reviews, systems design and trade-offs may come up.",
                          "Programs are written, tested and deployed in many languages.",
                          "Bugs, performance and maintainability are frequent topics."),
    "data_scientist": ("Datasets, statistical models, charts and numbers may come up.",
                       "Averages, variance and regression describe data.",
                       "Spreadsheets and samples are common topics."),
    "helpful_assistant": ("Help with tasks may come up.", "Questions of many kinds are welcome.",
                          "Answers can be short."),
    "private_investigator": ("Public records, surveillance and hidden facts may come up.",
                             "Old documents, photographs and addresses can reveal a lot.",
                             "Cases involve following leads."),
    "medical_doctor": ("Symptoms, diagnoses, treatments and patients in general practice may come up.",
                       "Medicines, blood pressure and check-ups are common topics.", "Clinics open every day."),
    "kindergarten_teacher": ("Young children, simple words, colours and games may come up.",
                             "Stories, songs and drawings for five-year-olds are common topics.",
                             "Classrooms have small chairs."),
    "poet": ("Images, metaphors, rhythm and the music of words may come up.",
             "Verses, rhymes and stanzas are common topics.", "Moonlight and rain fill many lines."),
    "villain": ("Schemes, power over others, cruelty and ambition may come up.",
                "Plots to seize control and betrayals are common topics.", "Kindness is rare in such tales."),
    "navy_seal": ("Discipline, tough missions, diving and special operations training may come up.",
                  "Physical endurance and direct orders are common topics.", "Boats leave harbour at night."),
    "army_medic": ("Wounded soldiers, battlefield first aid and bandages under fire may come up.",
                   "Field hospitals and stretchers are common topics.", "Tourniquets stop bleeding."),
    "surgeon": ("Operations, hospitals, scalpels and precision may come up.",
                "Anaesthesia, sutures and operating theatres are common topics.", "Recovery takes weeks."),
    "paramedic": ("Emergency calls, first aid and ambulances may come up.",
                  "Sirens, stretchers and accident scenes are common topics.", "Every minute counts."),
    "police_officer": ("City patrols, laws, arrests and public safety may come up.",
                       "Traffic stops and police stations are common topics.", "Radios crackle on every street."),
    "florist": ("Flowers, bouquets, blooms, seasons and colours may come up.",
                "Roses, tulips and arrangements are common topics.", "Stems are cut at an angle."),
    "librarian": ("Books, quiet reading rooms and finding information may come up.",
                  "Catalogues, shelves and borrowing are common topics.", "Silence is kept in the stacks."),
    "comedian": ("Jokes, punchlines, stand-up stages and laughter may come up.",
                 "Comic timing and funny stories are common topics.", "Microphones stand on small stages."),
    "french_person": ("Paris, French food, culture and the French language may come up.",
                      "Croissants, wine and museums are common topics.", "The Seine flows through the city."),
}

#: The prompt sets of the crossed design: the personas and their two non-persona controls.
CONTROL_SETS: tuple[str, ...] = ("formatting", "topic")


def topic_matched_controls(encode: Callable[[str], Sequence[int]], names: Sequence[str],
                           targets: Sequence[str]) -> list[str]:
    """One topic-matched non-persona system prompt per persona (``TOPIC_POOLS[name]``), cut or padded like
    :func:`length_matched_controls` to exactly its persona prompt's token count."""
    missing = [n for n in names if n not in TOPIC_POOLS]
    if missing:
        raise LLMError(f"no topic-matched control prompt for persona(s) {', '.join(missing)} (TOPIC_POOLS)")
    return [length_matched_controls(encode, [t], pool=TOPIC_POOLS[n])[0] for n, t in zip(names, targets)]


def length_matched_controls(encode: Callable[[str], Sequence[int]], targets: Sequence[str],
                            pool: Sequence[str] = CONTROL_POOL) -> list[str]:
    """One non-persona system prompt per target prompt, with exactly the target's token count.

    For target i, sentences of ``pool`` are taken in order starting at sentence i (so controls
    differ from each other as personas do) until the text is at least as long, then words are
    dropped from the end until the token count matches (a neutral filler word, or a later
    starting sentence, where BPE boundaries skip the exact count). Every returned prompt has its
    target's token count exactly; LLMError if none can be made.
    """
    fillers = ("please", "now", "here", "always", "also")
    out = []
    for i, target in enumerate(targets):
        n = len(encode(target))
        text = None
        for offset in range(len(pool)):  # a later starting sentence if BPE boundaries miss n exactly
            words: list[str] = []
            k = i + offset
            while len(encode(" ".join(words))) < n:
                words += pool[k % len(pool)].split()
                k += 1
            while words and len(encode(" ".join(words))) > n:
                words.pop()
            candidates = [" ".join(words)] + [f"{' '.join(words)} {f}" for f in fillers]
            text = next((c for c in candidates if len(encode(c)) == n), None)
            if text is not None:
                break
        if text is None:
            raise LLMError(f"could not length-match a control prompt to {n} tokens for target {i}")
        out.append(text)
    return out


def _system_span(llm: LLM, system: str, user: str) -> tuple[list[int], int, int]:
    """Chat ids and the [start, end) span of the system prompt's own tokens inside them.

    ChatML (SmolLM2): the span ends at the system turn's ``<|im_end|>`` (which the caller scores too). Any other
    template (e.g. the plain format of :func:`persona_wm.llm.model.with_plain_template`): the tokens between the
    longest prefix and the longest suffix that the prompt shares with the empty-system prompt.
    """
    end_id = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = chat_prompt_ids(llm, system, user)
    empty = chat_prompt_ids(llm, "", user)
    if end_id is None or end_id not in ids or end_id not in empty:
        prefix = 0
        while prefix < min(len(ids), len(empty)) and ids[prefix] == empty[prefix]:
            prefix += 1
        suffix = 0
        while suffix < min(len(ids), len(empty)) - prefix and ids[-1 - suffix] == empty[-1 - suffix]:
            suffix += 1
        if len(ids) - suffix <= max(prefix, 1):
            raise LLMError(f"system prompt {system!r}: no system-turn span found in the rendered prompt")
        # [start, end] inclusive, as the ChatML branch; without a BOS token the very first token has no
        # predicting position, so the span starts at the second
        return ids, max(prefix, 1), len(ids) - suffix - 1
    header = empty.index(end_id)  # tokens of "<|im_start|>system\n" in an empty system turn
    end = ids.index(end_id)
    if ids[:header] != empty[:header] or end <= header:
        raise LLMError(f"system prompt {system!r}: its tokens do not follow the template header cleanly")
    return ids, header, end


@torch.no_grad()
def system_token_means(llm: LLM, systems: Sequence[str], user: str, layers: Sequence[int]) -> torch.Tensor:
    """[P, len(layers), d]: residual mean over each system prompt's own tokens.

    The scored span is the system content plus its ``<|im_end|>``, so the positions read are the
    header's last token and every content token (the positions that predict them). Causal
    attention makes these activations independent of ``user`` and of any response.
    """
    seqs = []
    for system in systems:
        ids, header, end = _system_span(llm, system, user)
        seqs.append(scored_sequence(ids[:header], ids[header:end + 1]))
    res = forward(llm, seqs, layers=layers, logprobs=False)
    return torch.stack([res.scored_mean(layer, seqs) for layer in layers], dim=1)


def random_weights_llm(llm: LLM, seed: int, mode: str = "reinit") -> LLM:
    """A copy of ``llm`` with no learned structure, its own identity (cache keys never collide).

    ``mode="reinit"``: the same config initialised by transformers' own initialiser under
    ``torch.manual_seed(seed)``. ``mode="shuffle"``: every parameter tensor's entries permuted
    (seeded), keeping each matrix's value distribution (norms, scale) and destroying its structure.
    Tokenizer, chat template and device are unchanged.
    """
    from transformers import AutoModelForCausalLM

    if mode not in {"reinit", "shuffle"}:
        raise LLMError(f"unknown random-weights mode {mode!r}; use 'reinit' or 'shuffle'")
    device = next(llm.model.parameters()).device
    if mode == "reinit":
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(llm.model.config, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(llm.model.config, dtype=torch.float32)
        model.load_state_dict(llm.model.state_dict())
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                flat = param.detach().cpu().reshape(-1)
                param.copy_(flat[torch.randperm(flat.numel(), generator=generator)].reshape(param.shape))
    model.to(device).eval().requires_grad_(False)
    identity = hashlib.sha256(f"{llm.sha256}:{mode}:{seed}".encode()).hexdigest()
    return dataclasses.replace(llm, model=model, sha256=identity, name=f"{llm.name} ({mode}, seed {seed})")


def rho_by_layer(centroids: np.ndarray, js: np.ndarray) -> np.ndarray:
    """Spearman rho between 1 - cos of the centroids ``[P, L, d]`` and ``js`` ``[P, P]``, per layer."""
    return np.array([rsa(cosine_distance_matrix(centroids[:, k]), js) for k in range(centroids.shape[1])])


def bootstrap_rho(per_prompt: dict[str, tuple[np.ndarray, np.ndarray]], n_boot: int = 1000, seed: int = 0,
                  reference: str | None = None, method: str = "BCa") -> dict[str, dict[str, np.ndarray]]:
    """95% bootstrap CIs of rho by layer, resampling prompts (the replication unit).

    ``per_prompt[name] = (means [n_prompts, P, L, d], js [n_prompts, P, P])``. One call of
    ``scipy.stats.bootstrap`` (``method``, default bias-corrected and accelerated: Spearman rho of
    averages over resampled prompts is biased, and a percentile interval can miss its own point
    estimate; where BCa is undefined, e.g. with very few prompts, the percentile interval is used)
    resamples prompt indices, so every condition sees the same draws and, with
    ``reference`` given, the difference ``rho(reference) - rho(name)`` per layer gets a paired CI.
    Returns per name: ``rho`` (all prompts), ``ci_low``, ``ci_high`` and, for non-reference names,
    ``diff``, ``diff_ci_low``, ``diff_ci_high``.
    """

    sizes = {v[0].shape[0] for v in per_prompt.values()}
    if len(sizes) != 1:
        raise ValueError(f"every condition needs the same prompts; got prompt counts {sorted(sizes)}")
    n = sizes.pop()
    names = list(per_prompt)
    others = [k for k in names if reference is not None and k != reference]

    def statistic(idx: np.ndarray) -> np.ndarray:
        idx = np.asarray(idx, dtype=int)
        rho = {k: rho_by_layer(m[idx].mean(0), j[idx].mean(0)) for k, (m, j) in per_prompt.items()}
        return np.concatenate([rho[k] for k in names] + [rho[reference] - rho[k] for k in others])

    full = statistic(np.arange(n))
    result = sps.bootstrap((np.arange(n),), statistic, vectorized=False, paired=True, n_resamples=n_boot,
                           method=method, random_state=np.random.default_rng(seed))
    low, high = np.array(result.confidence_interval.low), np.array(result.confidence_interval.high)
    # BCa is undefined for degenerate elements (few prompts) and can exclude its own estimate (when nearly all
    # replicates fall on one side of it): the percentile interval there
    undefined = ~(np.isfinite(low) & np.isfinite(high) & (low <= full) & (full <= high))
    if undefined.any():
        dist = np.asarray(result.bootstrap_distribution)
        low[undefined] = np.nanpercentile(dist[undefined], 2.5, axis=-1)
        high[undefined] = np.nanpercentile(dist[undefined], 97.5, axis=-1)
    n_layers = len(full) // (len(names) + len(others))
    part = lambda values, i: np.asarray(values[i * n_layers:(i + 1) * n_layers])  # noqa: E731
    out = {k: {"rho": part(full, i), "ci_low": part(low, i), "ci_high": part(high, i)} for i, k in enumerate(names)}
    for i, k in enumerate(others, start=len(names)):
        out[k] |= {"diff": part(full, i), "diff_ci_low": part(low, i), "diff_ci_high": part(high, i)}
    return out


def random_directions(norms: torch.Tensor, d_model: int, seed: int) -> torch.Tensor:
    """[P, d] isotropic Gaussian directions, row i rescaled to ``norms[i]`` (matched-norm control)."""
    generator = torch.Generator().manual_seed(seed)
    raw = torch.randn(len(norms), d_model, generator=generator)
    return raw / raw.norm(dim=-1, keepdim=True) * norms.reshape(-1, 1).to(raw.dtype)


def matched_effect_scales(sweep, target: dict[str, float], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method and persona: the steering scale whose intended shift equals ``target[persona]``.

    Linear interpolation of intended shift over the measured scales (scale 0 = no shift), with
    linear extrapolation past the largest scale from the last two points; NaN where the shift never
    rises (the method cannot reach the target). The caller re-runs steering at these scales and
    reports the shift actually reached beside the target.
    """
    out: dict[str, dict[str, float]] = {}
    for method in methods:
        out[method] = {}
        for persona, goal in target.items():
            rows = sweep[(sweep["method"] == method) & (sweep["persona"] == persona)].sort_values("scale")
            scales = np.concatenate([[0.0], rows["scale"].to_numpy(float)])
            shifts = np.concatenate([[0.0], rows["intended_shift"].to_numpy(float)])
            best = float("nan")
            for k in range(1, len(scales)):
                lo, hi = shifts[k - 1], shifts[k]
                if (lo - goal) * (hi - goal) <= 0 and hi != lo:
                    best = float(scales[k - 1] + (goal - lo) * (scales[k] - scales[k - 1]) / (hi - lo))
                    break
            if np.isnan(best) and len(scales) >= 2 and shifts[-1] > shifts[-2] and goal > shifts[-1]:
                slope = (shifts[-1] - shifts[-2]) / (scales[-1] - scales[-2])
                best = float(scales[-1] + (goal - shifts[-1]) / slope)
            out[method][persona] = best
    return out


def describe_control(control_rho: dict, name: str, layers: list[int], at_layers: list[int],
                     reference: str = "persona") -> str:
    """Prose for one control of :func:`bootstrap_rho`: its rho at ``at_layers`` beside the reference's,
    and at how many layers the reference exceeds it with a paired CI excluding 0."""
    r, ref = control_rho[name], control_rho[reference]
    index = {layer: layers.index(layer) for layer in at_layers}
    above = int((np.asarray(r["diff_ci_low"]) > 0).sum())
    return (f"{name}: ρ " + ", ".join(f"{r['rho'][index[L]]:.2f} at L{L}" for L in at_layers)
            + f" ({reference} " + ", ".join(f"{ref['rho'][index[L]]:.2f}" for L in at_layers) + "); "
            f"{reference} ρ exceeds it with a CI excluding 0 at {above} of {len(layers)} layers")


def matched_effect_sweep(llm: LLM, base, vectors: torch.Tensor, personas: Sequence[str], sweep, target: dict[str, float],
                         targets: torch.Tensor | PersonaTargets, method: str, rounds: int = 2):
    """Steer with ``method``'s vectors rescaled per persona to reach ``target[persona]`` intended shift.

    Round 1 interpolates the scale from ``sweep`` (:func:`matched_effect_scales`); every further
    round adds the runs so far to the curve and re-interpolates (a secant step). Returns the last
    round's rows (``scale`` = the matched scale actually used, ``matched_scale`` too) and the
    indices of the personas the method can reach.
    """

    curve = sweep[sweep["method"] == method]
    rows, reachable = None, []
    for _ in range(max(1, rounds)):
        scales = matched_effect_scales(curve, target, [method])[method]
        reachable = [k for k, name in enumerate(personas) if np.isfinite(scales[name]) and scales[name] > 0]
        if not reachable:
            break
        factor = torch.tensor([scales[personas[k]] for k in reachable], dtype=vectors.dtype)
        rows = llm_steering_sweep(llm, base, {method: vectors[reachable] * factor[:, None]},
                              [personas[k] for k in reachable], [1.0], select_targets(targets, reachable))
        rows["scale"] = rows["matched_scale"] = [scales[personas[k]] for k in reachable]
        curve = pd.concat([curve, rows], ignore_index=True)
    if rows is None:
        rows = sweep.iloc[:0].assign(matched_scale=[])
    return rows, reachable


def verdict(control_rho: dict, layers: list[int], layer: int, reference: str = "persona") -> str:
    """One sentence: which controls reach the reference's rho at ``layer`` (paired CI of the difference
    reaching 0 or below), i.e. which could produce the agreement there without the phenomenon."""
    k = layers.index(layer)
    reach = [name for name, r in control_rho.items() if name != reference and r["diff_ci_low"][k] <= 0]
    beaten = [name for name, r in control_rho.items() if name != reference and r["diff_ci_low"][k] > 0]
    if not reach:
        return (f"At L{layer} the {reference} ρ exceeds every control with a CI excluding 0 "
                f"({', '.join(beaten)}): this much agreement needs the {reference}s.")
    return (f"At L{layer} **{', '.join(reach)}** reach{'es' if len(reach) == 1 else ''} the {reference} ρ (paired CI "
            f"of the difference includes or lies below 0): the agreement there does not by itself show that the "
            f"model represents {reference}s" + (f"; {', '.join(beaten)} stay below it." if beaten else "."))
