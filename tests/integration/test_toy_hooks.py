"""The one batched forward (persona_wm.toy.hooks) against the loops it replaced, bit for bit.

Each reference below is the loop a call site ran before (train.evaluate, probe.collect_activations,
steer.final_position, steer.steered_logits, em.next_token_probs, em.residuals), kept here verbatim as
the oracle; the batch size is chosen so that the contexts span several batches with a ragged last one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persona_wm.processes import get_process
from persona_wm.toy.em import Intervention, next_token_probs, residuals
from persona_wm.toy.hooks import (
    add_at_final_position,
    batched_forward,
    final_hook,
    hook_name,
    model_inputs,
    residual_hooks,
)
from persona_wm.toy.probe import collect_activations
from persona_wm.toy.steer import final_position, steered_logits
from persona_wm.toy.train import TrainConfig, build_model

BATCH = 7  # 25 contexts -> batches of 7, 7, 7, 4


@pytest.fixture(scope="module")
def setup():
    config = TrainConfig(process="z1r_x_z1r", n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=32, seed=3)
    process = get_process(config.process)
    model = build_model(config, process).eval()
    tokens = process.sample(25, 6, np.random.default_rng(0))
    return model, process, tokens


@torch.no_grad()
def _reference(model, tokens, n_tokens, hook=None, fwd_hooks=None, last=False, log=False):
    out, acts = [], []
    for start in range(0, len(tokens), BATCH):
        inputs = model_inputs(tokens[start:start + BATCH], n_tokens)
        if hook is not None:
            logits, cache = model.run_with_cache(inputs, names_filter=lambda n: n == hook)
            acts.append((cache[hook][:, -1] if last else cache[hook]).double().cpu().numpy())
        elif fwd_hooks is not None:
            logits = model.run_with_hooks(inputs, fwd_hooks=fwd_hooks(start))
        else:
            logits = model(inputs)
        logits = logits[:, -1] if last else logits
        out.append((torch.log_softmax if log else torch.softmax)(logits.double(), -1).cpu().numpy())
    return np.concatenate(out), (np.concatenate(acts) if acts else None)


def test_hook_names() -> None:
    assert hook_name(1) == "blocks.1.hook_resid_post"
    assert hook_name(0, "resid_pre") == "blocks.0.hook_resid_pre"
    for bad in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="layer must be a non-negative int"):
            hook_name(bad)
    with pytest.raises(ValueError, match="site must be a hook suffix"):
        hook_name(0, "hook.resid_post")


def test_residual_and_final_hooks_exist_in_the_model(setup) -> None:
    model, _, _ = setup
    assert residual_hooks(model) == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert final_hook(model) == residual_hooks(model)[-1]
    assert all(name in model.hook_dict for name in residual_hooks(model))


def test_probs_and_log_probs_match_the_plain_loop(setup) -> None:
    model, process, tokens = setup
    probs, _ = _reference(model, tokens, process.n_tokens)
    log_probs, _ = _reference(model, tokens, process.n_tokens, log=True)
    forward = batched_forward(model, tokens, process.n_tokens, batch=BATCH)
    assert forward.probs.dtype == np.float64 and forward.probs.shape == (25, 7, process.n_tokens)
    assert np.array_equal(forward.probs, probs) and forward.residuals == {}
    assert np.array_equal(batched_forward(model, tokens, process.n_tokens, batch=BATCH, output="log_probs").probs,
                          log_probs)
    assert np.array_equal(next_token_probs(model, tokens, process.n_tokens, batch=BATCH), probs)


def test_cached_residuals_match_run_with_cache(setup) -> None:
    model, process, tokens = setup
    hook = final_hook(model)
    probs, acts = _reference(model, tokens, process.n_tokens, hook=hook)
    forward = batched_forward(model, tokens, process.n_tokens, batch=BATCH, cache=[hook])
    assert np.array_equal(forward.residuals[hook], acts) and np.array_equal(forward.probs, probs)
    assert np.array_equal(residuals(model, tokens, process.n_tokens, hook, batch=BATCH), acts)
    every = collect_activations(model, tokens, process.n_tokens, residual_hooks(model), batch=BATCH)
    assert list(every) == residual_hooks(model) and np.array_equal(every[hook], acts)
    last_probs, last_acts = _reference(model, tokens, process.n_tokens, hook=hook, last=True)
    got_acts, got_probs = final_position(model, process, tokens, hook, batch=BATCH)
    assert np.array_equal(got_acts, last_acts) and np.array_equal(got_probs, last_probs)
    assert np.array_equal(got_acts, acts[:, -1])


def test_patches_match_run_with_hooks(setup) -> None:
    model, process, tokens = setup
    hook = final_hook(model)
    vectors = np.random.default_rng(1).normal(size=(len(tokens), model.cfg.d_model))

    def add(start):
        add = torch.as_tensor(vectors[start:start + BATCH], dtype=torch.float32)

        def hook_fn(resid, hook=None):
            resid[:, -1, :] = resid[:, -1, :] + add
            return resid

        return [(hook, hook_fn)]

    steered, _ = _reference(model, tokens, process.n_tokens, fwd_hooks=add, last=True)
    assert np.array_equal(steered_logits(model, tokens, process.n_tokens, hook, vectors, batch=BATCH), steered)
    plain = batched_forward(model, tokens, process.n_tokens, batch=BATCH, final_only=True).probs
    assert not np.allclose(steered, plain), "the patch must change the output"
    # the patch reaches only the final position: earlier positions are as without it
    full = batched_forward(model, tokens, process.n_tokens, batch=BATCH, patch=add_at_final_position(hook, vectors))
    assert np.array_equal(full.probs[:, :-1], batched_forward(model, tokens, process.n_tokens, batch=BATCH).probs[:, :-1])
    intervention = Intervention(hook, vector=vectors[0], ablate=vectors[1])
    expected, _ = _reference(model, tokens, process.n_tokens, fwd_hooks=lambda start: intervention.patch(slice(None), "cpu"))
    assert np.array_equal(next_token_probs(model, tokens, process.n_tokens, intervention, batch=BATCH), expected)


def test_cache_sees_the_patched_residual(setup) -> None:
    model, process, tokens = setup
    hook = final_hook(model)
    vectors = np.ones((len(tokens), model.cfg.d_model))
    plain = batched_forward(model, tokens, process.n_tokens, batch=BATCH, cache=[hook], output=None)
    patched = batched_forward(model, tokens, process.n_tokens, batch=BATCH, cache=[hook], output=None,
                              patch=add_at_final_position(hook, vectors))
    assert plain.probs is None
    np.testing.assert_allclose(patched.residuals[hook][:, -1] - plain.residuals[hook][:, -1], 1.0, atol=1e-5)
    assert np.array_equal(patched.residuals[hook][:, :-1], plain.residuals[hook][:, :-1])


def test_bad_arguments_are_named(setup) -> None:
    model, process, tokens = setup
    with pytest.raises(ValueError, match="output must be one of"):
        batched_forward(model, tokens, process.n_tokens, output="logits")
    with pytest.raises(ValueError, match="batch must be a positive int"):
        batched_forward(model, tokens, process.n_tokens, batch=0)
    with pytest.raises(ValueError, match="no hook point 'blocks.9.hook_resid_post'"):
        batched_forward(model, tokens, process.n_tokens, cache=[hook_name(9)])
