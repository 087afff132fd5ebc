"""K LoRA adapters trained at once over one frozen base model, each as :func:`persona_wm.llm.lora.finetune` trains it.

Why: study 05b's replicated design trains several adapters per arm (LoRA seeds, coupling sources, seed 004's
arms). One at a time, each step runs the whole frozen model on a batch of 16 sequences, which leaves a GPU mostly
idle. Stacked, adapter k's batch is the k-th block of one ``[K * batch, N, d]`` batch: the frozen weights run
once on all of it, and every LoRA-wrapped projection adds its adapter's low-rank update to its own block
(:class:`StackedLoraLinear`: two batched matmuls with a leading adapter axis), the way :mod:`persona_wm.toy.stacked`
stacks toy transformers.

What stays as in :func:`~persona_wm.llm.lora.finetune`, adapter by adapter:

* the initial A and B: taken from ``lora.peft_model_for`` with the adapter's seed (the same peft call);
* the batches: adapter k's own seeded permutation of its own training set, ``batch_size`` sequences a step;
* the loss: the mean response-token cross-entropy of adapter k's block; the optimised sum over adapters gives
  each adapter the gradient of its own mean (no parameter is shared), and AdamW is elementwise;
* early stopping on adapter k's validation set, if given;
* the result: written to the adapter cache under the key :func:`~persona_wm.llm.lora.adapter_key` gives it, in
  peft's state-dict format, so the usual ``finetune(...)`` call then reloads it instead of training.

The sums run in another order (a batched matmul instead of peft's two linears; a wider right padding), so an adapter
equals its lone training within float tolerance, not bit for bit (tests/unit/test_stacked_lora.py checks it).
All adapters of one call share the spec but for the seed (rank, alpha, targets, cut, lr, steps, batch size).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.llm import lora
from persona_wm.llm.generation import Decoding, generate_batch, hash_seed
from persona_wm.llm.model import LLM, LLMError, Scored, only_blocks, unembed
from persona_wm.llm.passes import has_generated, store_generated

__all__ = ["StackedJob", "StackedLoraLinear", "generate_stacked", "sample_adapters", "sample_stacked", "train_stacked"]

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class StackedJob:
    """One adapter of a stacked group: its training set, spec (seed included) and optional validation set."""

    seqs: Sequence[Scored]
    spec: lora.LoraSpec
    val: Sequence[Scored] | None = None


class StackedLoraLinear(torch.nn.Module):
    """A frozen linear layer plus K LoRA updates, adapter k acting on the k-th of K equal row blocks of the input.

    ``active`` = k applies adapter k to every row instead (a validation pass of one adapter).
    """

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(a.clone())  # [K, r, in]
        self.lora_b = torch.nn.Parameter(b.clone())  # [K, out, r]
        self.scaling = scaling
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.active is not None:
            return out + (x @ self.lora_a[self.active].T) @ self.lora_b[self.active].T * self.scaling
        k = self.lora_a.shape[0]
        if x.shape[0] % k:
            raise LLMError(f"StackedLoraLinear: a batch of {x.shape[0]} rows does not split into {k} adapters")
        rows = x.reshape(k, -1, x.shape[-1])  # adapter-major: adapter k's rows are the k-th block
        delta = torch.bmm(torch.bmm(rows, self.lora_a.transpose(1, 2)), self.lora_b.transpose(1, 2))
        return out + (delta * self.scaling).reshape(*x.shape[:-1], -1)


def _check_group(jobs: Sequence[StackedJob]) -> lora.LoraSpec:
    if not jobs:
        raise LLMError("train_stacked needs at least one job")
    shared = [dataclasses.replace(j.spec, seed=0) for j in jobs]
    if any(s != shared[0] for s in shared):
        raise LLMError("train_stacked: every job must share the LoRA spec but for the seed; got "
                       + "; ".join(sorted({str(s.as_dict()) for s in shared})))
    if any(not j.seqs for j in jobs):
        raise LLMError("train_stacked: a job has no training sequence")
    if len({bool(j.val) for j in jobs}) > 1:
        raise LLMError("train_stacked: give every job a validation set or none")
    return shared[0]


def _initial_lora(start: LLM, spec: lora.LoraSpec) -> dict[str, torch.Tensor]:
    """peft's initial LoRA state for ``spec`` (its seed included), by peft state-dict key."""
    from peft import get_peft_model_state_dict

    peft_model = lora.peft_model_for(copy.deepcopy(start.model), spec, start.n_layers)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    del peft_model
    return state


def _wrap(model: torch.nn.Module, inits: list[dict[str, torch.Tensor]], spec: lora.LoraSpec) -> dict[str, StackedLoraLinear]:
    """Replace every LoRA target of ``model`` (a copy of the start model) by a :class:`StackedLoraLinear` holding
    the K initial states; returns them by module path (peft's key without its prefix and suffix)."""
    paths = sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in inits[0]})
    modules: dict[str, StackedLoraLinear] = {}
    for path in paths:
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        a = torch.stack([init[f"{_PEFT_PREFIX}{path}.lora_A.weight"] for init in inits])
        b = torch.stack([init[f"{_PEFT_PREFIX}{path}.lora_B.weight"] for init in inits])
        device = base.weight.device
        wrapped = StackedLoraLinear(base, a.to(device), b.to(device), spec.alpha / spec.rank)
        setattr(parent, name, wrapped)
        modules[path] = wrapped
    return modules


def _state(modules: dict[str, StackedLoraLinear], k: int) -> dict[str, torch.Tensor]:
    """Adapter k's weights in peft's state-dict format (on the CPU)."""
    out = {}
    for path, m in modules.items():
        out[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_a[k].detach().cpu().clone().contiguous()
        out[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_b[k].detach().cpu().clone().contiguous()
    return out


def _set_active(modules: dict[str, StackedLoraLinear], k: int | None) -> None:
    for m in modules.values():
        m.active = k


def train_stacked(start: LLM, jobs: Sequence[StackedJob], base: LLM | None = None, eval_every: int = 0,
                  desc: str = "stacked LoRA", progress: bool = True) -> list[str]:
    """Train every job's adapter not yet in the cache, all at once; returns the jobs' adapter keys.

    Afterwards ``lora.finetune(start, job.seqs, job.spec, base, val=job.val, eval_every=eval_every)`` reloads each
    adapter from the cache. ``base`` (default ``start``) supplies the bottom residual, as in ``finetune``.
    """
    spec = _check_group(jobs)
    base = start if base is None else base
    if base is not start and not lora.same_bottom(start.model, base.model, spec.first_layer):
        raise LLMError(f"start model differs from the base model below the cut (layer {spec.first_layer})")
    if any(j.val for j in jobs) and eval_every < 1:
        raise LLMError("train_stacked: validation sets need eval_every >= 1 (steps between validation losses)")
    keys = [lora.adapter_key(start, j.seqs, j.spec, j.val, eval_every) for j in jobs]
    todo = [i for i, key in enumerate(keys)
            if not all((lora.adapter_dir(start, key) / f).is_file() for f in ("adapter.safetensors", "meta.json"))]
    if not todo:
        return keys
    group = [jobs[i] for i in todo]
    k_adapters, batch = len(group), spec.batch_size
    inits = [_initial_lora(start, j.spec) for j in group]
    model = copy.deepcopy(start.model).requires_grad_(False)
    modules = _wrap(model, inits, spec)
    params = [p for m in modules.values() for p in (m.lora_a, m.lora_b)]
    n_trainable = sum(p[0].numel() for p in params)  # one adapter's
    optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
    device = next(model.parameters()).device

    resids = [lora.bottom_resid(base, j.seqs, spec.first_layer) for j in group]
    widths = [max(len(s.ids) for s in j.seqs) for j in group]
    masks = [lora.loss_mask(j.seqs, w) for j, w in zip(group, widths)]
    targets = [lora.loss_targets(j.seqs, w) for j, w in zip(group, widths)]
    lengths = [torch.tensor([len(s.ids) for s in j.seqs]) for j in group]
    generators = [torch.Generator().manual_seed(j.spec.seed) for j in group]
    orders: list[list[int]] = [[] for _ in group]
    losses: list[list[float]] = [[] for _ in group]
    vals = None
    if group[0].val:
        vals = []
        for j in group:
            w = max(len(q.ids) for q in j.val)
            vals.append((lora.bottom_resid(base, j.val, spec.first_layer), lora.loss_mask(j.val, w),
                         lora.loss_targets(j.val, w)))
    val_curves: list[list[list[float]]] = [[] for _ in group]
    best: list[tuple[float, int, dict[str, torch.Tensor]] | None] = [None] * k_adapters

    def validate(step: int) -> None:
        for k, (v_resid, v_mask, v_targets) in enumerate(vals):
            _set_active(modules, k)
            v = lora.held_out_loss(model, v_resid, spec.first_layer, v_mask, v_targets, chunk=16)
            val_curves[k].append([step, v])
            if step > 0 and (best[k] is None or v < best[k][0]):
                best[k] = (v, step, _state(modules, k))
        _set_active(modules, None)

    if vals is not None:
        validate(0)
    started = time.perf_counter()
    d_model = resids[0].shape[-1]
    with torch.enable_grad():
        bar = tqdm(range(spec.steps), desc=f"{desc} x{k_adapters}", leave=False, disable=not progress)
        for step in bar:
            picks = []
            for k in range(k_adapters):
                if len(orders[k]) < batch:
                    orders[k] += torch.randperm(len(group[k].seqs), generator=generators[k]).tolist()
                picks.append(orders[k][:batch])
                orders[k] = orders[k][batch:]
            n = max(int(lengths[k][idx].max()) for k, idx in enumerate(picks))
            resid = torch.zeros((k_adapters * batch, n, d_model), dtype=resids[0].dtype)
            mask = torch.zeros((k_adapters * batch, n), dtype=torch.bool)
            target = torch.zeros((k_adapters * batch, n), dtype=torch.long)
            for k, idx in enumerate(picks):
                w = min(n, widths[k])
                rows = slice(k * batch, (k + 1) * batch)
                resid[rows, :w], mask[rows, :w], target[rows, :w] = (
                    resids[k][idx, :w], masks[k][idx, :w], targets[k][idx, :w])
            resid, mask, target = resid.to(device), mask.to(device), target.to(device)
            with only_blocks(model, spec.first_layer) as inner:
                final = inner(inputs_embeds=resid, use_cache=False).last_hidden_state
            token_loss = torch.nn.functional.cross_entropy(unembed(model, final[mask]).float(), target[mask],
                                                           reduction="none")
            owner = (torch.arange(k_adapters * batch, device=device) // batch)[:, None].expand_as(mask)[mask]
            per_adapter = torch.zeros(k_adapters, device=device).index_add_(0, owner, token_loss) / torch.bincount(
                owner, minlength=k_adapters)
            optimiser.zero_grad(set_to_none=True)
            per_adapter.sum().backward()
            optimiser.step()
            for k, value in enumerate(per_adapter.detach().cpu().tolist()):
                losses[k].append(float(value))
            if vals is not None and ((step + 1) % eval_every == 0 or step + 1 == spec.steps):
                with torch.no_grad():
                    validate(step + 1)
    group_s = time.perf_counter() - started
    for k, (i, job) in enumerate(zip(todo, group)):
        state = best[k][2] if best[k] is not None else _state(modules, k)
        meta = {"spec": job.spec.as_dict(), "losses": losses[k], "train_s": group_s / k_adapters,
                "step_s": group_s / k_adapters / spec.steps, "n_sequences": len(job.seqs),
                "n_tokens_trained": int(masks[k].sum()), "start_model": start.sha256, "n_trainable": n_trainable,
                "version": lora.LORA_VERSION,
                "stacked": {"group_size": k_adapters, "group_seconds": group_s, "device": str(device)}}
        if best[k] is not None:
            meta.update(val_curve=val_curves[k], best_step=best[k][1], best_val_loss=best[k][0])
        lora.save_adapter(lora.adapter_dir(start, keys[i]), state, meta)
    return keys


# --------------------------------------------------------------------------------------------
# Sampling K adapters at once


@torch.inference_mode()
def generate_stacked(start: LLM, states: Sequence[dict[str, torch.Tensor]], spec: lora.LoraSpec,
                     prompts: Sequence[Sequence[int]], decoding: Decoding) -> list[list[list[int]]]:
    """Every adapter's responses to ``prompts`` (peft state dicts ``states`` over ``start``), drawn in shared batches.

    Each adapter's rows are those of :func:`persona_wm.llm.generation.generate` (``n_samples`` per prompt,
    prompt-major); a chunk of ``max(1, decoding.batch // K)`` of them is decoded for all K adapters in one
    ``generate`` call of about ``decoding.batch`` rows, adapter k's copy being the k-th block
    (:class:`StackedLoraLinear`). Chunk c is seeded with ``(decoding.seed, "stacked", c)``: another random stream
    than one model at a time (the caller marks it with :attr:`Decoding.group`), the same distribution. Greedy
    decoding equals each merged adapter's own within float tolerance (tests/unit/test_stacked_lora.py).
    """
    if not states or not prompts:
        raise LLMError("generate_stacked needs at least one adapter and one prompt")
    k_adapters = len(states)
    model = copy.deepcopy(start.model).requires_grad_(False).eval()
    _wrap(model, [dict(s) for s in states], spec)
    stacked = dataclasses.replace(start, model=model)
    rows = [list(p) for p in prompts for _ in range(decoding.n_samples)]
    chunk = max(1, decoding.batch // k_adapters)
    out: list[list[list[int]]] = [[] for _ in range(k_adapters)]
    for c, begin in enumerate(range(0, len(rows), chunk)):
        part = rows[begin:begin + chunk]
        if decoding.sampled:
            torch.manual_seed(hash_seed(decoding.seed, "stacked", c))
        responses, _ = generate_batch(stacked, part * k_adapters, decoding, None)
        for k in range(k_adapters):
            out[k] += responses[k * len(part):(k + 1) * len(part)]
    del model
    return out


def sample_stacked(start: LLM, jobs: Sequence[StackedJob], prompts: Sequence[Sequence[int]], decoding: Decoding,
                   eval_every: int = 0) -> dict[str, Decoding]:
    """:func:`sample_adapters` for the adapters ``train_stacked(start, jobs, eval_every=eval_every)`` trains."""
    spec = _check_group(jobs)
    keys = [lora.adapter_key(start, j.seqs, j.spec, j.val, eval_every) for j in jobs]
    return sample_adapters(start, keys, spec, prompts, decoding)


def sample_adapters(start: LLM, keys: Sequence[str], spec: lora.LoraSpec, prompts: Sequence[Sequence[int]],
                    decoding: Decoding) -> dict[str, Decoding]:
    """Sample the cached adapters ``keys`` (trained over ``start`` with ``spec`` but for the seed) on ``prompts``
    at once and cache the responses where ``cached_generate(finetune(start, ...).llm, prompts, <its decoding>)``
    finds them.

    Returns each adapter key's decoding: ``decoding`` with :attr:`Decoding.group` set to a digest of the group
    (start model, adapter keys in order, decoding), so these responses are never confused with one model's own
    stream. A group whose responses are all cached already is not drawn again (a resumed run).
    """
    from safetensors.torch import load_file

    if not keys:
        raise LLMError("sample_adapters needs at least one adapter")
    digest = hashlib.sha256(json.dumps({"start": start.sha256, "adapters": list(keys), "decoding": decoding.as_dict()},
                                       sort_keys=True).encode()).hexdigest()
    grouped = dataclasses.replace(decoding, group=digest)
    tuned = [dataclasses.replace(start, sha256=lora.tuned_sha256(start, key)) for key in keys]
    if all(has_generated(t, prompts, grouped) for t in tuned):
        return dict.fromkeys(keys, grouped)
    files = [lora.adapter_dir(start, key) / "adapter.safetensors" for key in keys]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise LLMError(f"sample_adapters: adapter not trained yet: {missing[0]} (train_stacked or finetune first)")
    device = next(start.model.parameters()).device
    states = [{k: v.to(device) for k, v in load_file(f).items()} for f in files]
    responses = generate_stacked(start, states, spec, prompts, grouped)
    for t, r in zip(tuned, responses):
        store_generated(t, prompts, grouped, r)
    return dict.fromkeys(keys, grouped)
