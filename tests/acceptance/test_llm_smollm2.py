"""persona_wm.llm.model and persona_wm.llm.steer against the real offline model (loaded once per module, tiny inputs).

Every load dequantises the GGUF file (about 10 s on one core); the first one on a machine also saves its
config and tokenizer under .cache/llm/models/.
"""

from __future__ import annotations

import pytest
import torch

from persona_wm.llm import model as L
from persona_wm.llm import steer as llm_steer
from persona_wm.llm.personas import PERSONAS


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    model = L.load_llm(threads=1, device="cpu")  # the tolerances below are CPU's, on any machine
    # private tensor cache per test session (the model snapshot stays shared)
    model.cache_dir = tmp_path_factory.mktemp("llm_cache")
    return model


@pytest.fixture(scope="module")
def seqs(llm):
    poet = L.scored_sequence(L.chat_prompt_ids(llm, PERSONAS["poet"], "How can I sleep better?"),
                             L.encode(llm, "Keep a regular bedtime and dim the lights."))
    plain = L.scored_sequence(L.chat_prompt_ids(llm, "", "How can I sleep better?"), L.encode(llm, "Keep a schedule."))
    return [poet, plain]


def _hf_logprobs(llm, seq):
    with torch.inference_mode():
        logits = llm.model(torch.tensor([seq.ids])).logits[0]
    return torch.log_softmax(logits, -1)[seq.start - 1: len(seq.ids) - 1]


def test_identity_and_chat_template(llm):
    assert len(llm.sha256) == 64 and llm.n_layers == 30 and llm.d_model == 576
    text = llm.tokenizer.decode(L.chat_prompt_ids(llm, "", "Hi"))
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_hooked_forward_matches_plain_transformers(llm, seqs):
    res = L.forward(llm, seqs, layers=[1, 15, 30])
    for i, seq in enumerate(seqs):
        ours = res.logprobs[i, : seq.n_scored]
        assert torch.allclose(ours, _hf_logprobs(llm, seq), atol=1e-4), "hooked log-probs differ from transformers"
    with torch.inference_mode():
        hidden = llm.model(torch.tensor([seqs[0].ids]), output_hidden_states=True).hidden_states
    assert torch.allclose(res.resid[15][0, : len(seqs[0].ids)], hidden[15][0], atol=1e-4)


def test_transformer_bridge_agrees_with_transformers_and_our_hooks(llm, seqs):
    bridge = L.to_bridge(llm)
    ids = torch.tensor([seqs[0].ids])
    with torch.inference_mode():
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n == L.resid_hook_name(21))
    bridge_lp = torch.log_softmax(logits[0], -1)[seqs[0].start - 1: len(seqs[0].ids) - 1]
    assert (bridge_lp - _hf_logprobs(llm, seqs[0])).abs().max() < 1e-4, "TransformerBridge log-probs differ"
    ours = L.forward(llm, seqs[:1], layers=[21], logprobs=False).resid[21]
    assert torch.allclose(cache[L.resid_hook_name(21)], ours, atol=1e-3), "blocks.20.hook_resid_post != our layer 21"


def test_forward_from_a_layer_reproduces_the_full_pass(llm, seqs):
    res = L.forward(llm, seqs, layers=[21])
    lp, mask = L.forward_from(llm, res.resid[21], 21, seqs)
    assert torch.equal(mask, res.mask)
    assert float(((lp - res.logprobs).abs() * mask[..., None]).max()) < 1e-5
    steered, _ = L.forward_from(llm, res.resid[21], 21, seqs, add=torch.ones(llm.d_model) * 5)
    assert float((steered - res.logprobs).abs().max()) > 1e-2


def test_cache_hit_is_identical_and_does_not_rerun_the_model(llm, seqs):
    calls = []
    handle = llm.model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        compute = lambda: {"lp": L.forward(llm, seqs).logprobs}  # noqa: E731
        first = L.cached(llm, "test", {"ids": [list(s.ids) for s in seqs]}, compute)
        n_calls = len(calls)
        second = L.cached(llm, "test", {"ids": [list(s.ids) for s in seqs]}, compute)
    finally:
        handle.remove()
    assert n_calls == 1 and len(calls) == 1, "cache hit ran the model again"
    assert torch.equal(first["lp"], second["lp"])


def test_generation_capture_equals_teacher_forced_centroid(llm):
    prompts = [L.chat_prompt_ids(llm, PERSONAS["poet"], "What should I cook?"),
               L.chat_prompt_ids(llm, "", "Name a colour.")]
    responses, means = L.generate(llm, prompts, L.Decoding(6, 1.2), capture_layer=10)
    assert all(1 <= len(r) <= 6 for r in responses)
    scored = [L.scored_sequence(p, r) for p, r in zip(prompts, responses)]
    teacher = L.forward(llm, scored, layers=[10], logprobs=False).scored_mean(10, scored)
    assert torch.allclose(means, teacher, atol=1e-3, rtol=1e-4)
    again, _ = L.generate(llm, prompts, L.Decoding(6, 1.2))
    assert again == responses  # greedy: deterministic


def test_zero_steering_has_no_effect(llm):
    systems = [PERSONAS["poet"], ""]
    response = L.encode(llm, "Cook pasta with tomatoes and basil.")
    passes = [L.persona_pass(llm, systems, "What should I cook?", response, short_tokens=3, anchor=1, anchor_layers=[21],
                             anchor_tokens=4)]
    assert passes[0]["js"].shape == (2, 2) and float(passes[0]["js"][0, 1]) > 0
    base = llm_steer.steering_base(llm, 21, passes, 4, llm_steer.capability_items(3))
    targets = llm_steer.persona_targets(llm, systems, [("What should I cook?", response)], [0], 4)  # [P=1, B_e=1, T, V]
    frame = llm_steer.llm_steering_sweep(llm, base, {"centroid": torch.zeros(1, llm.d_model)}, ["poet"], [1.0], targets)
    row = frame.iloc[0]
    assert abs(row["intended_shift"]) < 1e-6 and row["spillover"] < 1e-6 and row["capability_accuracy_drop"] == 0


def test_missing_weights_raise_one_clear_error(tmp_path):
    with pytest.raises(L.LLMError, match="weights file not found: .*nothing.gguf"):
        L.load_llm(weights=tmp_path / "nothing.gguf")
    with pytest.raises(L.LLMError, match="package 'no_such_weights_pkg' is not installed"):
        L.weights_path(package="no_such_weights_pkg")


def test_layer_out_of_range_raises(llm, seqs):
    with pytest.raises(L.LLMError, match="layer 31 out of range 1..30"):
        L.forward(llm, seqs, layers=[31])


def test_model_snapshot_is_keyed_by_the_weights_hash_and_holds_no_weights(llm):
    """The snapshot of a GGUF file keeps its config and tokenizer (a few MB); the weights come from the GGUF file."""
    names = {p.name for p in llm.snapshot.iterdir()}
    assert llm.snapshot.name == llm.sha256[:16]
    assert {"config.json", "generation_config.json", "tokenizer.json", L.GGUF_SNAPSHOT_MARK} <= names
    assert not any(n.endswith((".safetensors", ".bin")) for n in names)
    assert sum(p.stat().st_size for p in llm.snapshot.iterdir()) < 20 * 2**20
    assert not getattr(llm.model, "is_quantized", False) and not hasattr(llm.model.config, "quantization_config")


def test_a_former_snapshot_with_float32_weights_is_replaced(llm, tmp_path):
    """A snapshot an older version wrote (with model.safetensors, without the mark) is rewritten without weights;
    the model loads the same weights as the module's."""
    former = tmp_path / "models" / llm.sha256[:16]
    former.mkdir(parents=True)
    (former / "config.json").write_text("{}")
    (former / "model.safetensors").write_bytes(b"0" * 1024)  # stands in for the 538 MB of float32 weights
    again = L.load_llm(threads=1, device="cpu", root=tmp_path)
    assert again.snapshot == former and (former / L.GGUF_SNAPSHOT_MARK).is_file()
    assert not (former / "model.safetensors").exists()
    for (name, a), b in zip(llm.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_one_lora_step_on_smollm2_changes_only_the_top_block(llm):
    """The real model's LoRA path (persona_wm.llm.lora, as study 05b uses it): one step on the top block only."""
    import math

    from persona_wm.llm import lora

    records = [{"system": "You are a poet.", "user": "How can I sleep better?", "response": "Keep a regular bedtime."}]
    seqs = lora.chat_sequences(llm, records)
    top = llm.n_layers - 1
    spec = lora.LoraSpec(rank=2, alpha=4.0, first_layer=top, lr=1e-3, steps=1, batch_size=1, seed=0)
    tuned = lora.finetune(llm, seqs, spec, cache=False)
    assert tuned.n_trainable > 0 and len(tuned.losses) == 1 and math.isfinite(tuned.losses[0])
    before, after = L.decoder(llm.model).layers, L.decoder(tuned.llm.model).layers
    assert torch.equal(before[top - 1].mlp.down_proj.weight, after[top - 1].mlp.down_proj.weight)
    assert not torch.equal(before[top].mlp.down_proj.weight, after[top].mlp.down_proj.weight)
