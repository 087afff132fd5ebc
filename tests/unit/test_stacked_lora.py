"""persona_wm.llm.stacked_lora: K adapters trained at once equal each adapter trained alone by lora.finetune.

A tiny random Llama (tests/llm_tiny.py) stands in for SmolLM2 (a few seconds on the CPU).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from persona_wm.llm import lora
from persona_wm.llm.generation import Decoding, generate
from persona_wm.llm.model import LLMError, Scored
from persona_wm.llm.passes import cached_generate
from persona_wm.llm.stacked_lora import StackedJob, StackedLoraLinear, sample_stacked, train_stacked
from tests.llm_tiny import tiny_llama


def _seqs(n: int, seed: int) -> list[Scored]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 7 + (i + seed) % 5  # lengths differ between the jobs: the stacked batch pads wider
        ids = torch.randint(2, 64, (length,), generator=g).tolist()
        out.append(Scored(tuple(ids[:-1]) + (1,), 3 + i % 3))
    return out


SPEC = lora.LoraSpec(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"), first_layer=1, lr=2e-2, steps=6,
                     batch_size=3, seed=0)


def _jobs(validation: bool) -> list[StackedJob]:
    return [StackedJob(_seqs(5 + k, seed=10 + k), dataclasses.replace(SPEC, seed=k),
                       _seqs(4, seed=20 + k) if validation else None) for k in range(3)]


@pytest.mark.parametrize("validation", [False, True])
def test_each_stacked_adapter_equals_its_lone_training(tmp_path: Path, validation: bool) -> None:
    stacked_llm, alone_llm = tiny_llama(tmp_path / "stacked"), tiny_llama(tmp_path / "alone")
    every = 2 if validation else 0
    jobs = _jobs(validation)
    keys = train_stacked(stacked_llm, jobs, eval_every=every, progress=False)
    for job, key in zip(jobs, keys):
        reloaded = lora.finetune(stacked_llm, job.seqs, job.spec, val=job.val, eval_every=every)
        assert reloaded.from_cache and reloaded.key == key and reloaded.meta["stacked"]["group_size"] == 3
        alone = lora.finetune(alone_llm, job.seqs, job.spec, val=job.val, eval_every=every, cache=False)
        torch.testing.assert_close(torch.tensor(reloaded.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-5)
        if validation:
            assert reloaded.meta["best_step"] == alone.meta["best_step"]
            torch.testing.assert_close(torch.tensor(reloaded.meta["val_curve"]), torch.tensor(alone.meta["val_curve"]),
                                       rtol=1e-4, atol=1e-5)
        # the merged models agree: every weight of the fine-tuned LLM within float tolerance
        for (name, a), (_, b) in zip(reloaded.llm.model.state_dict().items(), alone.llm.model.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    # the adapters differ from each other (three seeds, three training sets): stacking kept them apart
    states = [lora.finetune(stacked_llm, j.seqs, j.spec, val=j.val, eval_every=every).llm.model.state_dict()
              for j in jobs[:2]]
    name = next(n for n in states[0] if "layers.1.self_attn.q_proj" in n)
    assert not torch.allclose(states[0][name], states[1][name])


def test_a_second_call_trains_only_what_is_missing(tmp_path: Path) -> None:
    llm = tiny_llama(tmp_path)
    jobs = _jobs(False)
    first = train_stacked(llm, jobs[:2], progress=False)
    stamp = (lora.adapter_dir(llm, first[0]) / "meta.json").stat().st_mtime_ns
    keys = train_stacked(llm, jobs, progress=False)
    assert keys[:2] == first
    assert (lora.adapter_dir(llm, first[0]) / "meta.json").stat().st_mtime_ns == stamp  # not retrained
    assert lora.finetune(llm, jobs[2].seqs, jobs[2].spec).meta["stacked"]["group_size"] == 1


def test_the_stacked_layer_applies_adapter_k_to_block_k() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 3, bias=False)
    a, b = torch.randn(2, 2, 4), torch.randn(2, 3, 2)
    layer = StackedLoraLinear(base, a, b, scaling=0.5)
    x = torch.randn(4, 5, 4)  # 2 adapters x 2 rows
    out = layer(x)
    for k in range(2):
        expected = base(x[2 * k: 2 * k + 2]) + (x[2 * k: 2 * k + 2] @ a[k].T) @ b[k].T * 0.5
        torch.testing.assert_close(out[2 * k: 2 * k + 2], expected)
    layer.active = 1
    torch.testing.assert_close(layer(x), base(x) + (x @ a[1].T) @ b[1].T * 0.5)
    layer.active = None
    with pytest.raises(LLMError, match="does not split into 2 adapters"):
        layer(torch.randn(3, 5, 4))


def test_jobs_must_share_the_lora_shape(tmp_path: Path) -> None:
    llm = tiny_llama(tmp_path)
    jobs = _jobs(False)
    for change in ({"rank": 3}, {"targets": ("q_proj",)}, {"first_layer": 0}, {"batch_size": 2}, {"alpha": 2.0}):
        odd = StackedJob(jobs[0].seqs, dataclasses.replace(SPEC, **change))
        with pytest.raises(LLMError, match="share the LoRA's rank, alpha, targets, cut and batch size"):
            train_stacked(llm, [jobs[0], odd], progress=False)
    with pytest.raises(LLMError, match="at least one job"):
        train_stacked(llm, [], progress=False)
    with pytest.raises(LLMError, match="a validation set or none"):
        train_stacked(llm, [jobs[0], StackedJob(jobs[1].seqs, jobs[1].spec, _seqs(3, 0))], eval_every=1,
                      progress=False)


PROMPTS = [[5, 9, 13, 2], [7, 3], [11, 4, 6]]


def test_stacked_greedy_decoding_equals_each_merged_adapter(tmp_path: Path) -> None:
    llm = tiny_llama(tmp_path)
    jobs = _jobs(False)
    train_stacked(llm, jobs, progress=False)
    greedy = Decoding(max_new_tokens=6, repetition_penalty=1.2, batch=4)  # 4 // 3 adapters: one prompt a chunk
    decodings = sample_stacked(llm, jobs, PROMPTS, greedy)
    assert len(set(decodings.values())) == 1 and next(iter(decodings.values())).group is not None
    outs = []
    for job in jobs:
        tuned = lora.finetune(llm, job.seqs, job.spec)
        alone, _ = generate(tuned.llm, PROMPTS, greedy)
        stacked, _ = cached_generate(tuned.llm, PROMPTS, decodings[tuned.key])  # filled by sample_stacked
        assert stacked == alone
        outs.append(alone)
    assert outs[0] != outs[1]  # the adapters answer differently: the blocks were not mixed up


def test_stacked_samples_are_cached_under_their_group_and_never_redrawn_alone(tmp_path: Path) -> None:
    llm = tiny_llama(tmp_path)
    every = _jobs(False)
    train_stacked(llm, every, progress=False)
    jobs = every[:2]
    sampled = Decoding(max_new_tokens=5, temperature=1.0, n_samples=4, seed=3, batch=6)
    decodings = sample_stacked(llm, jobs, PROMPTS, sampled)
    tuned = lora.finetune(llm, jobs[0].seqs, jobs[0].spec)
    grouped = decodings[tuned.key]
    first, _ = cached_generate(tuned.llm, PROMPTS, grouped)
    assert len(first) == len(PROMPTS) * 4
    assert sample_stacked(llm, jobs, PROMPTS, sampled) == decodings  # a resumed run reads the same entries
    assert cached_generate(tuned.llm, PROMPTS, grouped)[0] == first
    with pytest.raises(LLMError, match="drawn for a stack of adapters"):
        generate(tuned.llm, PROMPTS, grouped)
    # another group (other adapters) is another stream, cached apart
    other = sample_stacked(llm, [jobs[0], every[2]], PROMPTS, sampled)
    assert other[tuned.key].group != grouped.group
    with pytest.raises(LLMError, match="adapter not trained yet"):
        sample_stacked(llm, [jobs[0], StackedJob(_seqs(3, 99), SPEC)], PROMPTS, sampled)


def _assert_same(stacked: lora.Tuned, alone: lora.Tuned) -> None:
    torch.testing.assert_close(torch.tensor(stacked.losses), torch.tensor(alone.losses), rtol=1e-4, atol=1e-5)
    for (name, a), (_, b) in zip(stacked.llm.model.state_dict().items(), alone.llm.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_a_recipe_search_stacks_its_candidates(tmp_path: Path) -> None:
    """Candidates with their own learning rate and step count in one stack each equal their lone training; the
    ones that differ only in their step count share one block of rows (saved at their own step)."""
    stacked_llm, alone_llm = tiny_llama(tmp_path / "stacked"), tiny_llama(tmp_path / "alone")
    seqs = _seqs(6, seed=3)
    specs = [dataclasses.replace(SPEC, lr=lr, steps=n) for lr in (2e-2, 5e-3) for n in (3, 6)]
    jobs = [StackedJob(seqs, sp) for sp in specs]
    train_stacked(stacked_llm, jobs, progress=False)
    for job in jobs:
        reloaded = lora.finetune(stacked_llm, job.seqs, job.spec)
        assert reloaded.from_cache and reloaded.meta["stacked"]["lanes"] == 2
        assert len(reloaded.losses) == job.spec.steps
        _assert_same(reloaded, lora.finetune(alone_llm, job.seqs, job.spec, cache=False))


def _start(llm, seed: int) -> lora.Tuned:
    """A fine-tuned start model: a LoRA over ``llm`` on a subset of SPEC's modules (another rank and alpha)."""
    spec = lora.LoraSpec(rank=3, alpha=6.0, targets=("q_proj", "down_proj"), first_layer=1, lr=3e-2, steps=4,
                         batch_size=3, seed=seed)
    return lora.finetune(llm, _seqs(6, seed=40 + seed), spec)


def test_adapters_over_several_start_models_train_in_one_stack(tmp_path: Path) -> None:
    """Jobs starting from the shared model and from two fine-tuned models (their LoRA frozen, on their rows only)
    each equal ``finetune`` over their own start; greedy decoding equals each merged adapter's."""
    stacked_llm, alone_llm = tiny_llama(tmp_path / "stacked"), tiny_llama(tmp_path / "alone")
    starts = [None, _start(stacked_llm, 1), _start(stacked_llm, 2)]
    alone_starts = [None, _start(alone_llm, 1), _start(alone_llm, 2)]
    jobs = [StackedJob(_seqs(5, seed=60 + k), dataclasses.replace(SPEC, seed=k), start=st)
            for k, st in enumerate(starts)]
    keys = train_stacked(stacked_llm, jobs, progress=False)
    greedy = Decoding(max_new_tokens=6, repetition_penalty=1.2, batch=6)
    decodings = sample_stacked(stacked_llm, jobs, PROMPTS, greedy)
    outs = []
    for job, key, alone_start in zip(jobs, keys, alone_starts):
        own = stacked_llm if job.start is None else job.start.llm
        reloaded = lora.finetune(own, job.seqs, job.spec)
        assert reloaded.from_cache and reloaded.key == key and reloaded.meta["stacked"]["group_size"] == 3
        alone = lora.finetune(alone_llm if alone_start is None else alone_start.llm, job.seqs, job.spec, cache=False)
        _assert_same(reloaded, alone)
        stacked_out, _ = cached_generate(reloaded.llm, PROMPTS, decodings[key])
        assert stacked_out == generate(alone.llm, PROMPTS, greedy)[0]
        outs.append(stacked_out)
    assert outs[1] != outs[2]  # the two start models' rows were kept apart


def test_a_start_model_must_be_a_lora_over_the_shared_model(tmp_path: Path) -> None:
    llm, other = tiny_llama(tmp_path / "a"), tiny_llama(tmp_path / "b")
    foreign = _start(other, 1)
    chained = lora.finetune(foreign.llm, _seqs(4, seed=7), dataclasses.replace(SPEC, steps=2))
    job = StackedJob(_seqs(5, seed=1), SPEC, start=dataclasses.replace(chained, key=foreign.key))
    with pytest.raises(LLMError, match="is not the shared model"):
        train_stacked(llm, [job], progress=False)


def test_a_start_adapter_on_other_modules_and_below_the_cut(tmp_path: Path) -> None:
    """A start LoRA on modules the new LoRA leaves alone (k_proj; block 0, below the cut) stays in force: training
    (bottom residual from the start model) and greedy decoding (the whole model) equal ``finetune`` over it."""
    stacked_llm, alone_llm = tiny_llama(tmp_path / "stacked"), tiny_llama(tmp_path / "alone")
    wide = dataclasses.replace(SPEC, targets=("k_proj", "q_proj"), first_layer=0, seed=5, steps=4)
    starts = [lora.finetune(m, _seqs(6, seed=8), wide) for m in (stacked_llm, alone_llm)]
    jobs = [StackedJob(_seqs(5, seed=1), SPEC, start=starts[0]), StackedJob(_seqs(5, seed=2), SPEC)]
    keys = train_stacked(stacked_llm, jobs, progress=False)
    greedy = Decoding(max_new_tokens=6, repetition_penalty=1.2, batch=6)
    decodings = sample_stacked(stacked_llm, jobs, PROMPTS, greedy)
    reloaded = lora.finetune(starts[0].llm, jobs[0].seqs, SPEC)
    alone = lora.finetune(starts[1].llm, jobs[0].seqs, SPEC, cache=False)
    assert reloaded.key == keys[0]
    _assert_same(reloaded, alone)
    assert cached_generate(reloaded.llm, PROMPTS, decodings[keys[0]])[0] == generate(alone.llm, PROMPTS, greedy)[0]
