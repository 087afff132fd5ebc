"""Tests of the stacked trainer (persona_wm.toy.stacked): N toy transformers trained in one step.

The claims checked: the stacked forward is HookedTransformer's (logits to float round-off), stacking
and unstacking lose nothing, one stacked optimiser step is N independent ``train()`` steps (same
gradients, same Adam updates), each model's data stream and evaluation are ``train()``'s, a stacked
model ends where its sequential twin does (an equivalence test against the seed-to-seed spread),
and the cache keeps stacked and sequential entries apart while ``load_or_train`` reads both. Models
are tiny, so the file runs in well under a minute on a CPU.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy import stats

from persona_wm.processes import get_process
from persona_wm.toy import stacked as S
from persona_wm.toy.train import (
    TrainConfig,
    build_model,
    cache_key,
    cache_path,
    cached_trainers,
    eval_tokens,
    evaluate,
    learning_rate,
    load_or_train,
    model_inputs,
    train,
)

TINY = {"n_layers": 2, "d_model": 16, "n_heads": 2, "d_head": 8, "d_mlp": 32, "batch_size": 32, "eval_every": 5,
        "eval_sequences": 64, "warmup_steps": 2}


def _models(configs):
    return [build_model(c, get_process(c.process)) for c in configs]


def _tokens(process, n_models, batch, length, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([model_inputs(process.sample(batch, length - 1, rng), process.n_tokens)
                        for _ in range(n_models)])


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("act_fn", ["relu", "gelu"])
def test_forward_matches_hooked_transformer(act_fn) -> None:
    configs = [TrainConfig(process="mess3", seed=s, act_fn=act_fn, **TINY) for s in range(3)]
    models = _models(configs)
    stacked = S.StackedTransformer.from_models(models)
    tokens = _tokens(get_process("mess3"), 3, 8, 11)
    with torch.no_grad():
        logits = stacked(tokens)
        subset = stacked(tokens[[2, 0]], models=torch.tensor([2, 0]))
        for i, model in enumerate(models):
            torch.testing.assert_close(logits[i], model(tokens[i]), rtol=1e-5, atol=1e-5,
                                       msg=f"stacked logits of model {i} differ from its HookedTransformer")
        torch.testing.assert_close(subset, logits[[2, 0]], msg="forward(models=...) is not the selected models")
    short = tokens[:, :, :4]  # fewer positions than the context: the causal mask still holds
    with torch.no_grad():
        torch.testing.assert_close(stacked(short)[1], models[1](short[1]), rtol=1e-5, atol=1e-5)


def test_both_attention_paths_agree() -> None:
    """The written-out attention (used on a GPU) and torch's fused kernel (CPU) compute the same thing."""
    q, k, v = torch.randn(3, 6, 2, 11, 8).unbind(0)
    fused = S.causal_attention(q, k, v, 8 ** 0.5, fused=True)
    torch.testing.assert_close(S.causal_attention(q, k, v, 8 ** 0.5, fused=False), fused, rtol=1e-5, atol=1e-6)
    weights = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(
        torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf")), dim=-1)
    torch.testing.assert_close(fused[..., 0, :], v[..., 0, :])  # the first position sees only itself
    torch.testing.assert_close(fused, weights @ v, rtol=1e-5, atol=1e-6)


def test_stack_unstack_round_trip_is_exact() -> None:
    configs = [TrainConfig(process="z1r", seed=s, **TINY) for s in (4, 5)]
    models = _models(configs)
    stacked = S.StackedTransformer.from_models(models)
    for model, sd in zip(models, stacked.state_dicts()):
        original = model.state_dict()
        assert list(sd) == list(original)
        for key, value in original.items():
            assert torch.equal(sd[key], value), key
        fresh = build_model(configs[0], get_process("z1r"))
        fresh.load_state_dict(sd)  # strict: every key, every shape


def test_unsupported_architecture_is_refused() -> None:
    config = TrainConfig(process="z1r", act_fn="silu", **TINY)
    with pytest.raises(ValueError, match="act_fn"):
        S.StackedTransformer.from_models(_models([config]))
    config = TrainConfig(process="z1r", normalization_type="LNPre", **TINY)
    with pytest.raises(ValueError, match="normalization_type"):
        S.StackedTransformer.from_models(_models([config]))


# ------------------------------------------------------------------------------------------ one step
@pytest.mark.parametrize("per_pass", [None, 1, 2])
def test_stacked_steps_equal_sequential_steps(per_pass) -> None:
    """Three Adam steps (warm-up lr, weight decay on) of 3 stacked models = 3 x 3 single-model steps."""
    configs = [TrainConfig(process="mess3", seed=s, weight_decay=0.01, lr=3e-3, **TINY) for s in range(3)]
    process = get_process("mess3")
    singles = _models(configs)
    stacked = S.StackedTransformer.from_models(_models(configs))
    optimizer = S.make_optimizer(stacked, configs[0])
    passes = stacked.chunks(per_pass) if per_pass else None
    optimizers = [torch.optim.Adam(m.parameters(), lr=c.lr, weight_decay=c.weight_decay)
                  for m, c in zip(singles, configs)]
    rng = np.random.default_rng(7)
    for step in range(3):
        batch = torch.as_tensor(np.stack([process.sample(32, 11, rng) for _ in configs]))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(configs[0], step)
        losses = S.training_step(stacked, optimizer, batch, process.n_tokens, passes)
        for i, (model, opt) in enumerate(zip(singles, optimizers)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(configs[i], step)
            logits = model(model_inputs(batch[i, :, :-1].numpy(), process.n_tokens))
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 3), batch[i].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grads = S._stacked_layout({k: p.grad for k, p in model.named_parameters()}, model.cfg)
            for name, p in stacked.named_parameters():
                torch.testing.assert_close(p.grad[i], grads[name], rtol=1e-4, atol=1e-6,
                                           msg=f"step {step}: model {i}'s gradient of {name} is not its own")
            opt.step()
            assert losses[i].item() == pytest.approx(loss.item(), rel=1e-5)
    # attn.b_K's exact gradient is 0 (a softmax does not see a shift shared by all keys of a query), so both
    # trainers' b_K gradients are round-off, which Adam normalises into steps of random sign: b_K is compared
    # only through that gradient (round-off level in both, checked here), every other weight after the steps.
    for layer in range(configs[0].n_layers):
        assert stacked.blocks[layer].b_qkv.grad[:, 16:32].abs().max() < 1e-6
        assert max(m.blocks[layer].attn.b_K.grad.abs().max() for m in singles) < 1e-6
    for i, (model, sd) in enumerate(zip(singles, stacked.state_dicts())):
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point and value.numel() > 1 and not key.endswith("attn.b_K"):
                torch.testing.assert_close(sd[key], value, rtol=1e-4, atol=1e-6,
                                           msg=f"model {i}'s {key} after 3 Adam steps differs")


# ------------------------------------------------------------------------------------------ data, eval
@pytest.mark.parametrize(("prefetch", "device_sampler"), [(False, False), (True, False), (True, True)])
def test_streams_are_train_streams(monkeypatch, prefetch, device_sampler) -> None:
    """Each model's batches are what train()'s generator gives it, across chunk boundaries and data processes."""
    base = TrainConfig(process="semi_factored", steps=7, seed=0, **TINY)
    configs = [base, replace(base, seed=1), replace(base, seed=2, data_sector="(1,0)")]
    width = max(get_process("semi_factored").n_states, get_process("semi_factored").n_tokens, 11)
    if device_sampler:  # the torch sampler holds beliefs x tokens per row
        width = max(get_process("semi_factored").n_states * get_process("semi_factored").n_tokens, width)
    # 2 models share a process: chunks of 3 steps (the torch sampler has its own, larger bound)
    monkeypatch.setattr(S, "SAMPLER_ELEMENTS_CUDA" if device_sampler else "SAMPLER_ELEMENTS", 3 * 2 * 32 * width)
    streams = S.StackedStreams(configs, "cpu", prefetch=prefetch, device_sampler=device_sampler)
    assert streams.chunk_steps == 3
    rngs = [np.random.default_rng([c.seed, 0]) for c in configs]
    try:
        for _ in range(7):
            batch = streams.next().numpy()
            for i, c in enumerate(configs):
                expected = S.data_process(c).sample(c.batch_size, c.context_length + 1, rngs[i])
                np.testing.assert_array_equal(batch[i], expected)
        with pytest.raises(RuntimeError, match="handed out"):
            streams.next()
    finally:
        streams.close()


def test_torch_sampler_is_the_numpy_sampler() -> None:
    """The GPU path's sampler (run here on CPU tensors) gives GHMM.sample's tokens for the same uniforms."""
    for name in ("mess3", "semi_factored"):
        process = get_process(name)
        uniforms = np.random.default_rng(3).random((11, 500))
        expected = process.sample(500, 11, np.random.default_rng(3))
        np.testing.assert_array_equal(process.sample_from_uniforms(uniforms), expected)
        np.testing.assert_array_equal(S.sample_from_uniforms_torch(process, torch.from_numpy(uniforms)).numpy(),
                                      expected)


def test_stacked_evaluation_matches_evaluate() -> None:
    configs = [TrainConfig(process="z1r_x_z1r", seed=s, **TINY) for s in range(3)]
    models = _models(configs)
    processes = [get_process(c.process) for c in configs]
    stacked = S.StackedTransformer.from_models(models).eval()
    rows = S._StackedEval(configs, processes, "cpu")(stacked, [0, 2])
    for i, row in zip([0, 2], rows):
        expected = evaluate(models[i], processes[i], eval_tokens(configs[i], processes[i]))
        assert row.keys() == expected.keys()
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_evaluation_memo_shares_a_fine_tunes_targets_with_its_base(monkeypatch) -> None:
    """A fine-tune (same process and seed as its base) reuses the base's evaluation set; the values are unchanged."""
    base = TrainConfig(process="z1r_x_z1r", seed=1, **TINY)
    tuned = TrainConfig(process="z1r_x_z1r", seed=1, init_from=base, lr=1e-4, steps=3, **TINY)
    other = TrainConfig(process="z1r_x_z1r", seed=2, **TINY)
    processes = [get_process("z1r_x_z1r")] * 2
    calls = []
    real = S.eval_tokens
    monkeypatch.setattr(S, "eval_tokens", lambda c, p: calls.append(c.seed) or real(c, p))
    memo: dict = {}
    first = S._StackedEval([base, other], processes, "cpu", memo)
    second = S._StackedEval([tuned, other], processes, "cpu", memo)
    assert calls == [1, 2]  # the second evaluator computed nothing
    plain = S._StackedEval([tuned, other], processes, "cpu")
    assert calls == [1, 2, 1, 2]
    for ev in (first, second):
        assert torch.equal(ev.tokens, plain.tokens) and torch.equal(ev.p_opt, plain.p_opt)
        assert ev.constant == plain.constant


# ------------------------------------------------------------------------------------------ training
def test_stacked_and_sequential_training_are_equivalent(tmp_path) -> None:
    """Five seeds, 40 steps: stacked final CE = sequential final CE within a tenth of the seed spread (TOST)."""
    configs = [TrainConfig(process="mess3", steps=40, seed=s, batch_size=64, eval_every=10, eval_sequences=256,
                           snapshot_steps=(0, 20), **{k: v for k, v in TINY.items()
                                                      if k not in ("batch_size", "eval_every", "eval_sequences")})
               for s in range(5)]
    stacked = S.train_many(configs, device="cpu", threads=1, progress=False, cache_dir=tmp_path / "stacked")
    sequential = [train(c, device="cpu", progress=False) for c in configs]
    for a, b in zip(stacked, sequential):
        assert a.trainers == ("stacked",) and b.trainers == ("sequential",)
        assert [r["step"] for r in a.history] == [r["step"] for r in b.history] == [0, 10, 20, 30, 40]
        assert [set(r) for r in a.history] == [set(r) for r in b.history]
        assert a.history[0]["train_loss"] is None
        assert a.history[0]["model_ce"] == pytest.approx(b.history[0]["model_ce"], rel=1e-6)  # same init
        assert sorted(a.snapshots) == sorted(b.snapshots) == [0, 20]
    ce_stacked = np.array([m.final_eval["model_ce"] for m in stacked])
    ce_sequential = np.array([m.final_eval["model_ce"] for m in sequential])
    spread = ce_sequential.std(ddof=1)
    assert spread > 1e-4, "the seeds must differ for the comparison to mean anything"
    diff = ce_stacked - ce_sequential
    margin = 0.1 * spread
    # two one-sided paired t-tests (TOST): the mean difference lies within +-margin
    p_low = stats.ttest_1samp(diff, -margin, alternative="greater").pvalue
    p_high = stats.ttest_1samp(diff, margin, alternative="less").pvalue
    assert max(p_low, p_high) < 0.05, (f"stacked vs sequential final CE not equivalent within {margin:.2e}: "
                                       f"differences {diff}, seed spread {spread:.2e}")


def test_groups_and_fine_tunes(tmp_path) -> None:
    """Configs with different schedules train in separate groups; a fine-tune starts from its (stacked) base."""
    base = TrainConfig(process="semi_factored", steps=6, seed=0, snapshot_steps=(0,), **TINY)
    other = replace(base, seed=1, lr=3e-3)  # another schedule: another group
    tune = replace(base, steps=4, lr=2e-4, warmup_steps=0, final_lr_fraction=1.0, eval_every=4, snapshot_steps=(),
                   init_from=base, data_sector="(1,0)")
    assert S.group_configs([base, other, replace(base, seed=2)]) == [[0, 2], [1]]
    tuned, first, _ = S.train_many([tune, base, other], device="cpu", progress=False, cache_dir=tmp_path)
    assert tuned.trainers == ("stacked", "stacked") and first.trainers == ("stacked",)
    assert cache_path(tune, tmp_path, ("stacked", "stacked")).exists()
    loaded_base = load_or_train(base, device="cpu", cache_dir=tmp_path, progress=False)
    for key, value in loaded_base.model.state_dict().items():
        assert torch.equal(value, first.model.state_dict()[key]), key
    # the fine-tune really started from that base: a sequential fine-tune of the same base ends at the same CE
    twin = train(tune, device="cpu", cache_dir=tmp_path, progress=False)
    assert twin.trainers == ("sequential", "stacked")
    assert twin.history[0]["model_ce"] == pytest.approx(tuned.history[0]["model_ce"], rel=1e-6)
    assert twin.final_eval["model_ce"] == pytest.approx(tuned.final_eval["model_ce"], rel=1e-3)


# ------------------------------------------------------------------------------------------ cache
def test_cache_keys_round_trip_and_mixing(tmp_path) -> None:
    a, b = (TrainConfig(process="z1r", steps=4, seed=s, **TINY) for s in (0, 1))
    assert cache_key(a) == a.key() == cache_key(a, ("sequential",))  # sequential keys are unchanged
    assert cache_key(a, ("stacked",)) != a.key()
    with pytest.raises(ValueError, match="trainers"):
        cache_key(a, ("stacked", "stacked"))
    (trained,) = S.train_many([a], device="cpu", progress=False, cache_dir=tmp_path)
    assert cache_path(a, tmp_path, ("stacked",)).exists() and not cache_path(a, tmp_path).exists()
    blob = torch.load(cache_path(a, tmp_path, ("stacked",)), weights_only=False)
    assert {"config", "state_dict", "history", "snapshots", "train_seconds"} <= set(blob)
    assert blob["trainers"] == ["stacked"] and blob["stacked"]["group_size"] == 1
    loaded = load_or_train(a, device="cpu", cache_dir=tmp_path, progress=False)
    assert loaded.from_cache and loaded.trainers == ("stacked",) and loaded.history == trained.history
    for key, value in trained.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    again = S.train_many([a], device="cpu", progress=False, cache_dir=tmp_path)[0]  # warm: loaded, not retrained
    assert again.from_cache and again.trainers == ("stacked",)
    # a sequential entry of the same config wins (it is the reference; its key is the old one)
    load_or_train(a, device="cpu", cache_dir=tmp_path / "seq", progress=False)
    (tmp_path / cache_path(a).name).write_bytes((tmp_path / "seq" / cache_path(a).name).read_bytes())
    assert cached_trainers(a, tmp_path) == ("sequential",)
    assert load_or_train(a, device="cpu", cache_dir=tmp_path, progress=False).trainers == ("sequential",)
    # a set that mixes trainers is trained, but not silently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = S.train_many([a, b], device="cpu", progress=False, cache_dir=tmp_path)
    assert [m.trainers for m in out] == [("sequential",), ("stacked",)]
    assert any("mix trainers" in str(w.message) for w in caught)


def test_a_named_trainer_uses_only_its_own_entries(tmp_path) -> None:
    """trained_models(trainer=...) never hands back another trainer's model, whatever the cache holds, and
    a fine-tune's whole lineage (its base too) is that trainer's; a bad trainer name is refused."""
    base = TrainConfig(process="z1r", steps=4, seed=0, snapshot_steps=(0,), **TINY)
    tune = replace(base, steps=2, lr=2e-4, warmup_steps=0, final_lr_fraction=1.0, eval_every=2, snapshot_steps=(),
                   init_from=base)
    sequential = S.trained_models([base, tune], "sequential", device="cpu", progress=False, cache_dir=tmp_path)
    assert [m.trainers for m in sequential] == [("sequential",), ("sequential", "sequential")]
    assert not any(m.from_cache for m in sequential)
    with pytest.raises(ValueError, match="no stacked entry"):
        load_or_train(base, device="cpu", cache_dir=tmp_path, progress=False, trainer="stacked")
    stacked = S.trained_models([base, tune], "stacked", device="cpu", progress=False, cache_dir=tmp_path)
    assert [m.trainers for m in stacked] == [("stacked",), ("stacked", "stacked")]
    assert not any(m.from_cache for m in stacked)  # the sequential entries were there, and not used
    again = S.trained_models([tune, base], "stacked", device="cpu", progress=False, cache_dir=tmp_path)
    assert all(m.from_cache for m in again) and again[0].trainers == ("stacked", "stacked")
    for key, value in again[1].model.state_dict().items():
        assert torch.equal(value, stacked[0].model.state_dict()[key]), key
    # the sequential lineage is still what a sequential run loads (the stacked base does not replace it)
    assert [m.trainers for m in S.trained_models([tune], "sequential", device="cpu", progress=False,
                                                 cache_dir=tmp_path)] == [("sequential", "sequential")]
    with pytest.raises(ValueError, match="trainer must be one of"):
        S.trained_models([base], "parallel", device="cpu", progress=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="trainer must be one of"):
        cached_trainers(base, tmp_path, trainer="parallel")


def test_parallel_passes_on_two_threads_compute_what_one_thread_computes() -> None:
    """On a CPU with 2 torch threads the one-model passes run on 2 Python threads (one intra-op thread each):
    weights and histories are bit for bit those of a 1-thread run, and the thread count is restored."""
    configs = [TrainConfig(process="mess3", steps=6, seed=s, **TINY) for s in (0, 1, 7)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, info_one = S.train_group(configs, "cpu", progress=False)
        torch.set_num_threads(2)
        two, info_two = S.train_group(configs, "cpu", progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert (info_one["parallel_passes"], info_two["parallel_passes"]) == (1, 2)
    for a, b in zip(one, two):
        assert a.history == b.history
        for key, value in a.model.state_dict().items():
            assert torch.equal(value, b.model.state_dict()[key]), key
