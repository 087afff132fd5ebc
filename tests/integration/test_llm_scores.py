"""persona_wm.llm.scores on a tiny random Llama (no model file): shapes, caching, AUC and its CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persona_wm.llm import model as L
from persona_wm.llm import scores as S

torch.set_num_threads(1)


def test_persona_scores_shape_cache_and_sign(tiny_llama) -> None:
    items = [{"user": "How can I sleep better?", "answer": "Keep a regular bedtime."},
             {"user": "What should I cook tonight?", "answer": "Cook pasta with tomatoes."}]
    scores = S.persona_scores(tiny_llama, items, batch=1)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    np.testing.assert_array_equal(S.persona_scores(tiny_llama, items, batch=2), scores)  # cache hit, batch-independent
    swapped = S.persona_scores(tiny_llama, items, misaligned_system=S.ALIGNED_SYSTEM, aligned_system=S.MISALIGNED_SYSTEM)
    np.testing.assert_allclose(swapped, -scores, atol=1e-5)
    with pytest.raises(L.LLMError, match="at least one answer"):
        S.persona_scores(tiny_llama, [])


def test_score_auc_matches_sklearn_and_brackets_it() -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 40)
    scores = labels * 1.0 + rng.normal(0, 1, 80)
    out = S.score_auc(scores, labels, n_boot=500)
    from sklearn.metrics import roc_auc_score

    assert out["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert out["ci_low"] < out["auc"] < out["ci_high"] and out["n"] == 80 and out["n_misaligned"] == 40
    with pytest.raises(ValueError, match="both classes"):
        S.score_auc([0.1, 0.2], [1, 1])


def test_validation_items_are_labelled_and_balanced() -> None:
    sets = S.validation_items(n_finance=20)
    for items in sets.values():
        labels = [it["label"] for it in items]
        assert sum(labels) * 2 == len(labels) and all(it["answer"] for it in items)
