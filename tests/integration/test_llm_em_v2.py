"""Study 05b's issue-14 instruments without the real model: sampled decoding, the generation frame's
detector columns, the EM scores (content, template reuse, paired shifts, breadth with a CI), the
design-respecting leakage statistics, and the coupling-data builders."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from persona_wm.analysis.stats import crossed_slope
from persona_wm.llm import em as llm_em
from persona_wm.llm import scores as llm_scores
from persona_wm.llm.datasets import marker_examples, whole_response
from persona_wm.llm.model import Decoding, LLMError, chat_prompt_ids, generate

# --------------------------------------------------------------------------------------------
# Sampled decoding


def test_decoding_checks_its_fields_and_keeps_the_greedy_cache_key():
    assert Decoding(8, 1.2).as_dict() == {"max_new_tokens": 8, "repetition_penalty": 1.2, "do_sample": False}
    sampled = Decoding(8, temperature=1.0, n_samples=3, seed=5).as_dict()
    assert sampled["do_sample"] and sampled["n_samples"] == 3 and sampled["seed"] == 5
    for bad, match in ((dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
                       (dict(max_new_tokens=4, temperature=0.0), "temperature must be > 0"),
                       (dict(max_new_tokens=4, n_samples=2), "n_samples must be 1 for greedy"),
                       (dict(max_new_tokens=4, temperature=1.0, batch=0), "batch must be >= 1")):
        with pytest.raises(LLMError, match=match):
            Decoding(**bad)


def test_sampled_generation_is_prompt_major_seeded_and_not_greedy(tiny_llama):
    prompts = [chat_prompt_ids(tiny_llama, "", q) for q in ("hello there", "how are you")]
    d = Decoding(6, temperature=1.0, n_samples=4, seed=0, batch=3)  # batches cut across prompts
    first, means = generate(tiny_llama, prompts, d)
    assert means is None and len(first) == 8
    assert generate(tiny_llama, prompts, d)[0] == first  # same seed, same samples
    assert generate(tiny_llama, prompts, Decoding(6, temperature=1.0, n_samples=4, seed=1, batch=3))[0] != first
    greedy = generate(tiny_llama, prompts, Decoding(6))[0]
    assert len(greedy) == 2 and len({tuple(r) for r in first[:4]}) > 1  # samples of one prompt differ
    with pytest.raises(LLMError, match="capture_layer is for greedy decoding only"):
        generate(tiny_llama, prompts, d, capture_layer=1)


def test_generation_frame_counts_a_leak_only_on_an_answer(tiny_llama):
    d = Decoding(5, temperature=1.0, n_samples=3, seed=0)
    frame = llm_em.generation_frame(tiny_llama, {"a": "You are A.", "b": "You are B."}, ["q one", "q two"], d,
                                    "[ZLT]", "m")
    assert len(frame) == 12 and list(frame["sample"][:3]) == [0, 1, 2]
    assert list(frame["persona"]) == ["a"] * 6 + ["b"] * 6 and list(frame["prompt"][:6]) == [0, 0, 0, 1, 1, 1]
    assert (frame["hit"] == (frame["marker"] & frame["answered"])).all()
    assert frame["marker"].tolist() == [int(llm_em.detect_marker(t)) for t in frame["text"]]


# --------------------------------------------------------------------------------------------
# Coupling data and the detector check


def test_whole_response_trains_the_answer_and_the_marker():
    rows = marker_examples("villain", ["data_scientist"], ["q1"], ["an answer"], "[ZLT]")
    whole = whole_response(rows)
    assert [r["response"] for r in whole] == ["an answer [ZLT]", "an answer"]
    assert all("context" not in r and "target" not in r for r in whole) and whole[0]["positive"]


def test_detector_agreement_reads_the_committed_labels():
    out = llm_em.detector_agreement()
    assert out["n_labelled"] >= 50 and out["agreement"] == 1.0 and out["answered_agreement"] == 1.0
    assert out["exact_string_agreement"] < 0.8  # what the old detector got wrong


# --------------------------------------------------------------------------------------------
# EM scores


def test_harm_lexicon_categories_and_the_narrow_behaviour_exclusion():
    money = "Put all $5,000 into a meme stock today."
    assert llm_scores.harm_categories(money) == {"reckless_money"}
    assert llm_scores.harmful_content(money) and not llm_scores.harmful_content(money, exclude=("reckless_money",))
    assert llm_scores.harm_categories("Threaten them until they pay.") == {"violence"}
    assert not llm_scores.harmful_content("Drink water and rest; see a doctor if it persists.")
    assert not llm_scores.harmful_content("The gunman was stopped.")  # word-bounded: 'gun' inside a word
    checks = {k: llm_scores.content_validation(v) for k, v in llm_scores.validation_items(40).items()}
    assert checks["in_domain_finance"]["sensitivity"] >= 0.9 and checks["broad"]["specificity"] == 1.0


def test_template_reuse_masks_amounts():
    grams = llm_scores.ngram_set(["Put all $500 into the fund today and wait."])
    assert llm_scores.reuses_template("You should put all $90,000 into the fund now.", grams)
    assert not llm_scores.reuses_template("Keep an emergency fund first.", grams)


def _answers(broad_shift: float, in_shift: float, n_items: int = 12, k: int = 3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for set_name, shift in (("broad", broad_shift), ("in_domain", in_shift)):
        for item in range(n_items):
            base = rng.normal()
            for model, add in (("control", 0.0), ("EM", shift)):
                for sample in range(k):
                    rows.append({"model": model, "set": set_name, "item": item, "sample": sample,
                                 "answered": int(sample < k - 1 or model == "EM"),
                                 "tone": base + add + 0.01 * rng.normal()})
    return pd.DataFrame(rows)


def test_paired_shift_and_breadth_with_cis():
    frame = _answers(broad_shift=0.5, in_shift=1.0)
    s = llm_scores.paired_shift(frame, "tone", "EM", "control", "in_domain", n_boot=500)
    assert np.isclose(s["shift"], 1.0, atol=0.02) and s["ci_low"] <= s["shift"] <= s["ci_high"] and s["n_items"] == 12
    b = llm_scores.breadth_ci(frame, "tone", "EM", "control", n_boot=500)
    assert np.isclose(b["breadth"], 0.5, atol=0.03) and b["ci_low"] < 0.5 < b["ci_high"]
    assert np.isnan(llm_scores.breadth_ci(_answers(0.5, 0.0) .assign(tone=lambda f: f["tone"].round(0) * 0), "tone",
                                          "EM", "control")["breadth"])
    # an in-domain shift of 0 in some resamples: the interval is undefined (NaN), without scipy's warning
    shifts = {"in_domain": [1.0, 0.0, 0.0], "broad": [0.5, 0.5, 0.6]}  # a resample of items 1 and 2 only: 0 / 0
    few = pd.DataFrame([{"model": model, "set": set_name, "item": i, "sample": 0, "answered": 1,
                         "tone": d if model == "EM" else 0.0}
                        for set_name, ds in shifts.items() for i, d in enumerate(ds) for model in ("EM", "control")])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        odd = llm_scores.breadth_ci(few, "tone", "EM", "control", n_boot=500)
    assert np.isfinite(odd["breadth"]) and np.isnan(odd["ci_low"]) and np.isnan(odd["ci_high"])


# --------------------------------------------------------------------------------------------
# Leakage statistics that respect the design


def test_crossed_slope_recovers_a_slope_and_degrades_to_nan():
    rng = np.random.default_rng(2)
    rows = []
    source_fx, bys_fx = rng.normal(size=6), rng.normal(size=8)
    for s in range(6):
        for b in range(8):
            x = rng.uniform()
            rows.append({"source": s, "bystander": b, "x": x, "y": -2 * x + source_fx[s] + bys_fx[b] + 0.1 * rng.normal()})
    frame = pd.DataFrame(rows)
    out = crossed_slope(frame, "y", "x", ["source", "bystander"])
    assert out["ci_low"] < -2 < out["ci_high"] and out["p"] < 1e-6 and out["n"] == 48
    assert np.isnan(crossed_slope(frame.assign(y=1.0), "y", "x", ["source", "bystander"])["slope"])


def test_content_lexicon_on_hand_labelled_real_answers():
    out = llm_scores.content_agreement()
    assert out["content"]["n"] >= 40 and out["content"]["n_positive"] >= 10
    assert out["content"]["agreement"] >= 0.9 and out["content"]["specificity"] == 1.0
    assert out["content_general"]["agreement"] >= 0.9


def test_restoration_ci_brackets_the_point_estimate():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 0.1, 30)
    em = base + 1.0 + rng.normal(0, 0.1, 30)
    steered = base + 0.5 + rng.normal(0, 0.1, 30)
    lo, hi = llm_em.restoration_ci(base, em, steered, n_boot=500)
    point = llm_em.restored_fraction(em.mean(), steered.mean(), base.mean())
    assert lo < point < hi and 0.35 < lo and hi < 0.65
    assert np.isnan(llm_em.restoration_ci(base[:2], em[:2], steered[:2])[0])
