"""persona_wm.llm.controls: length-matched control prompts, system-token reads, random-weights models,
bootstrap CIs over prompts, and the steering controls — on a tiny random Llama (no model file)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from persona_wm.llm import controls as C
from persona_wm.llm import model as L

torch.set_num_threads(1)


def test_length_matched_controls_have_exact_token_counts(tiny_llama) -> None:
    targets = ["You are a poet who answers in verse.", "You are a surgeon.", "How can I sleep better?"]
    encode = lambda text: L.encode(tiny_llama, text)  # noqa: E731
    controls = C.length_matched_controls(encode, targets)
    assert [len(encode(c)) for c in controls] == [len(encode(t)) for t in targets]
    assert len(set(controls)) == len(controls)
    assert not any(word in " ".join(controls).lower() for word in ("you are", "poet", "surgeon"))


def test_system_token_means_read_only_the_system_turn(tiny_llama) -> None:
    systems = ["You are a poet.", "You are a surgeon."]
    a = C.system_token_means(tiny_llama, systems, "How can I sleep better?", [1, 2, 4])
    b = C.system_token_means(tiny_llama, systems, "What should I cook tonight?", [1, 2, 4])
    assert a.shape == (2, 3, tiny_llama.d_model)
    torch.testing.assert_close(a, b)  # causal: the user turn cannot reach the system tokens
    assert not torch.allclose(a[0], a[1])


def test_plain_prompt_format_renders_a_preamble_and_its_system_span(tiny_llama) -> None:
    """``prompt_format: plain`` (a base model): the system prompt is a text preamble; the empty one leaves none,
    and system-token reads find the preamble's tokens without ChatML markers."""
    plain = L.with_plain_template(tiny_llama)
    assert tiny_llama.tokenizer.chat_template != L.PLAIN_TEMPLATE  # the original handle is untouched
    text = plain.tokenizer.decode(L.chat_prompt_ids(plain, "You are a poet.", "How are you?"))
    assert text.endswith("You are a poet.\n\nUser: How are you?\nAssistant:")
    empty = plain.tokenizer.decode(L.chat_prompt_ids(plain, "", "How are you?"))
    assert "\n\n" not in empty and empty.endswith("User: How are you?\nAssistant:")
    ids, start, end = C._system_span(plain, "You are a poet.", "How are you?")
    assert plain.tokenizer.decode(ids[start:end + 1]).strip() in {"You are a poet.", "are a poet."}  # no BOS here
    a = C.system_token_means(plain, ["You are a poet.", "You are a surgeon."], "How are you?", [1, 2])
    assert a.shape == (2, 2, plain.d_model) and not torch.allclose(a[0], a[1])


@pytest.mark.parametrize("mode", ["reinit", "shuffle"])
def test_random_weights_model_keeps_architecture_and_changes_identity(tiny_llama, mode) -> None:
    random = C.random_weights_llm(tiny_llama, seed=0, mode=mode)
    assert random.sha256 != tiny_llama.sha256 and random.n_layers == tiny_llama.n_layers
    assert C.random_weights_llm(tiny_llama, seed=0, mode=mode).sha256 == random.sha256
    original = dict(tiny_llama.model.named_parameters())
    changed = [name for name, p in random.model.named_parameters() if p.numel() > 1 and not torch.equal(p, original[name])]
    assert changed, "no weight changed"
    if mode == "shuffle":  # same values per matrix, permuted
        name = changed[0]
        torch.testing.assert_close(dict(random.model.named_parameters())[name].flatten().sort().values,
                                   original[name].flatten().sort().values)
    with pytest.raises(L.LLMError, match="unknown random-weights mode"):
        C.random_weights_llm(tiny_llama, seed=0, mode="zero")


def test_bootstrap_rho_pairs_conditions_and_detects_a_real_difference() -> None:
    rng = np.random.default_rng(0)
    n, p, layers, d = 8, 6, 2, 5
    base = rng.normal(size=(p, layers, d))
    js = np.stack([np.abs(base[:, 1, None, 0] - base[None, :, 1, 0]) + 0.01 * rng.random((p, p)) for _ in range(n)])
    js = (js + js.transpose(0, 2, 1)) / 2
    means = np.repeat(base[None], n, 0) + 0.01 * rng.normal(size=(n, p, layers, d))
    noise = rng.normal(size=(n, p, layers, d))
    out = C.bootstrap_rho({"signal": (means, js), "noise": (noise, js)}, n_boot=200, seed=0, reference="signal")
    assert out["signal"]["rho"].shape == (layers,)
    assert np.all(out["signal"]["ci_low"] <= out["signal"]["rho"] + 1e-9)
    assert "diff" in out["noise"] and "diff" not in out["signal"]
    with pytest.raises(ValueError, match="same prompts"):
        C.bootstrap_rho({"a": (means, js), "b": (means[:3], js[:3])})


def test_random_directions_match_norms_and_matched_effect_interpolates() -> None:
    norms = torch.tensor([1.0, 2.0, 3.0])
    vectors = C.random_directions(norms, 16, seed=0)
    torch.testing.assert_close(vectors.norm(dim=-1), norms)
    torch.testing.assert_close(C.random_directions(norms, 16, seed=0), vectors)
    sweep = pd.DataFrame({"method": "persona_vector", "persona": ["a"] * 3 + ["b"] * 3,
                          "scale": [0.5, 1.0, 2.0] * 2, "intended_shift": [0.1, 0.2, 0.4, -0.1, -0.2, -0.3]})
    scales = C.matched_effect_scales(sweep, {"a": 0.3, "b": 0.1}, ["persona_vector"])["persona_vector"]
    assert scales["a"] == pytest.approx(1.5) and np.isnan(scales["b"])
    beyond = C.matched_effect_scales(sweep, {"a": 0.6}, ["persona_vector"])["persona_vector"]["a"]
    assert beyond == pytest.approx(3.0)  # extrapolated from the last two points
