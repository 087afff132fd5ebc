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

The sums run in another order (a batched matmul instead of peft's two linears; a wider right padding; Adam's update
written out per adapter), so an adapter equals its lone training within float tolerance, not bit for bit
(tests/unit/test_stacked_lora.py checks it).

All adapters of one call share the LoRA's shape and batch (rank, alpha, targets, cut, batch size); the seed, the
learning rate and the step count may differ (a recipe search stacks its candidates: each has its own learning
rate; jobs that differ only in their step count share one block of rows and are saved at their own step). A job
may also start from a fine-tuned model that is itself a LoRA over the shared model (``StackedJob.start``, e.g.
study 05b's EM-first arms, which start from each seed's EM model or aligned control): that adapter stays frozen
and is added to the job's rows only, so adapters over several start models train in one stack.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.llm import lora
from persona_wm.llm.generation import Decoding, generate_batch, hash_seed
from persona_wm.llm.model import LLM, LLMError, Scored, only_blocks, unembed
from persona_wm.llm.passes import has_generated, store_generated

__all__ = ["StackedJob", "StackedLoraLinear", "generate_stacked", "job_key", "job_start", "sample_adapters",
           "sample_stacked", "start_lora", "train_stacked"]

_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class StackedJob:
    """One adapter of a stacked group: its training set, spec (seed, lr and steps included), optional validation
    set, and optional start model: a :class:`persona_wm.llm.lora.Tuned` whose adapter is a LoRA over the group's
    shared model (``None``: the shared model itself). ``lora.finetune(job_start(shared, job).llm, job.seqs,
    job.spec, ...)`` then reloads the result."""

    seqs: Sequence[Scored]
    spec: lora.LoraSpec
    val: Sequence[Scored] | None = None
    start: lora.Tuned | None = None


def job_start(shared: LLM, job: StackedJob) -> LLM:
    """The model ``job`` fine-tunes: its start's merged model, or the shared model."""
    return shared if job.start is None else job.start.llm


def job_key(shared: LLM, job: StackedJob, eval_every: int = 0) -> str:
    """The adapter-cache key ``lora.finetune`` gives ``job`` (over its own start model)."""
    return lora.adapter_key(job_start(shared, job), job.seqs, job.spec, job.val, eval_every)


class StackedLoraLinear(torch.nn.Module):
    """A frozen linear layer plus K LoRA updates, adapter k acting on the k-th of K equal row blocks of the input.

    ``active`` = k applies adapter k to every row instead (a validation pass of one adapter).
    """

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float,
                 frozen: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.base = base
        self.lora_a = torch.nn.Parameter(a.clone())  # [K, r, in]
        self.lora_b = torch.nn.Parameter(b.clone())  # [K, out, r]
        self.scaling = scaling
        # optional frozen per-adapter start LoRAs, scaling folded into B: [K, r0, in], [K, out, r0] (zeros: none)
        self.frozen = frozen
        self.active: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.active is not None:
            k = self.active
            out = out + (x @ self.lora_a[k].T) @ self.lora_b[k].T * self.scaling
            if self.frozen is not None:
                out = out + (x @ self.frozen[0][k].T) @ self.frozen[1][k].T
            return out
        k = self.lora_a.shape[0]
        if x.shape[0] % k:
            raise LLMError(f"StackedLoraLinear: a batch of {x.shape[0]} rows does not split into {k} adapters")
        rows = x.reshape(k, -1, x.shape[-1])  # adapter-major: adapter k's rows are the k-th block
        delta = torch.bmm(torch.bmm(rows, self.lora_a.transpose(1, 2)), self.lora_b.transpose(1, 2)) * self.scaling
        if self.frozen is not None:
            delta = delta + torch.bmm(torch.bmm(rows, self.frozen[0].transpose(1, 2)), self.frozen[1].transpose(1, 2))
        return out + delta.reshape(*x.shape[:-1], -1)


def _shape(spec: lora.LoraSpec) -> lora.LoraSpec:
    """The part of a spec every job of a stack shares (rank, alpha, targets, cut, batch size)."""
    return dataclasses.replace(spec, seed=0, lr=0.0, steps=1)


def _check_group(jobs: Sequence[StackedJob]) -> lora.LoraSpec:
    if not jobs:
        raise LLMError("train_stacked needs at least one job")
    shared = [_shape(j.spec) for j in jobs]
    if any(s != shared[0] for s in shared):
        raise LLMError("train_stacked: every job must share the LoRA's rank, alpha, targets, cut and batch size "
                       "(seed, lr and steps may differ); got " + "; ".join(sorted({str(s.as_dict()) for s in shared})))
    if any(not j.seqs for j in jobs):
        raise LLMError("train_stacked: a job has no training sequence")
    if len({bool(j.val) for j in jobs}) > 1:
        raise LLMError("train_stacked: give every job a validation set or none")
    return shared[0]


def _initial_lora(start: LLM, spec: lora.LoraSpec) -> dict[str, torch.Tensor]:
    """peft's initial LoRA state for ``spec`` (its seed included), by peft state-dict key."""
    peft_model = lora.peft_model_for(copy.deepcopy(start.model), spec, start.n_layers)
    state = {k: v.detach().clone() for k, v in lora.adapter_state(peft_model).items()}
    del peft_model
    return state


def _paths(state: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k[len(_PEFT_PREFIX):].rsplit(".lora_", 1)[0] for k in state})


def start_lora(shared: LLM, start: lora.Tuned | None) -> tuple[dict[str, torch.Tensor], float] | None:
    """A job start's adapter (peft state dict, its scaling), checked to be a LoRA over ``shared``; None: no start."""
    from safetensors.torch import load_file

    if start is None:
        return None
    if lora.tuned_sha256(shared, start.key) != start.llm.sha256:
        raise LLMError(f"stacked LoRA: the job's start model {start.llm.sha256[:12]} is not the shared model "
                       f"{shared.sha256[:12]} plus its adapter {start.key[:12]}: stack it over its own start instead")
    file = lora.adapter_dir(shared, start.key) / "adapter.safetensors"
    if not file.is_file():
        raise LLMError(f"stacked LoRA: the job's start adapter is not in the cache: {file}")
    return load_file(file), start.spec.alpha / start.spec.rank


def _wrap(model: torch.nn.Module, inits: list[dict[str, torch.Tensor]], spec: lora.LoraSpec,
          starts: Sequence[tuple[dict[str, torch.Tensor], float] | None] | None = None) -> dict[str, StackedLoraLinear]:
    """Replace every LoRA target of ``model`` (a copy of the shared model) by a :class:`StackedLoraLinear` holding
    the K initial states (and the K start LoRAs, frozen, where ``starts`` gives any); returns them by module path
    (peft's key without its prefix and suffix)."""
    trained = _paths(inits[0])
    starts = [None] * len(inits) if starts is None else list(starts)
    # a start adapter may also change modules the new LoRA leaves alone (other targets, blocks below the cut):
    # those get its frozen update only (rank-0 trainable part), and are not returned
    paths = sorted(set(trained).union(*(_paths(st[0]) for st in starts if st is not None)))
    modules: dict[str, StackedLoraLinear] = {}
    for path in paths:
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        base = getattr(parent, name)
        device = base.weight.device
        if path in trained:
            a = torch.stack([init[f"{_PEFT_PREFIX}{path}.lora_A.weight"] for init in inits])
            b = torch.stack([init[f"{_PEFT_PREFIX}{path}.lora_B.weight"] for init in inits])
        else:
            a = torch.zeros(len(inits), 0, base.in_features, dtype=base.weight.dtype)
            b = torch.zeros(len(inits), base.out_features, 0, dtype=base.weight.dtype)
        frozen = None
        key_a, key_b = f"{_PEFT_PREFIX}{path}.lora_A.weight", f"{_PEFT_PREFIX}{path}.lora_B.weight"
        here = [(k, st[0][key_a], st[0][key_b] * st[1]) for k, st in enumerate(starts) if st is not None and key_a in st[0]]
        if here:  # padded to the largest start rank: zero rows and columns add nothing
            rank = max(sa.shape[0] for _, sa, _ in here)
            fa = torch.zeros(len(inits), rank, a.shape[-1], dtype=a.dtype)
            fb = torch.zeros(len(inits), b.shape[1], rank, dtype=b.dtype)
            for k, sa, sb in here:
                fa[k, :sa.shape[0]], fb[k, :, :sb.shape[1]] = sa, sb
            frozen = (fa.to(device), fb.to(device))
        wrapped = StackedLoraLinear(base, a.to(device), b.to(device), spec.alpha / spec.rank, frozen)
        setattr(parent, name, wrapped)
        if path in trained:
            modules[path] = wrapped
        else:
            wrapped.requires_grad_(False)
    return modules


def _state(modules: dict[str, StackedLoraLinear], k: int) -> dict[str, torch.Tensor]:
    """Adapter k's weights in peft's state-dict format (on the CPU)."""
    out = {}
    for path, m in modules.items():
        out[f"{_PEFT_PREFIX}{path}.lora_A.weight"] = m.lora_a[k].detach().cpu().clone().contiguous()
        out[f"{_PEFT_PREFIX}{path}.lora_B.weight"] = m.lora_b[k].detach().cpu().clone().contiguous()
    return out


def _set_active(model: torch.nn.Module, k: int | None) -> None:
    """Every stacked layer of ``model`` (frozen-only ones too) applies adapter ``k`` to all rows (None: block k)."""
    for m in model.modules():
        if isinstance(m, StackedLoraLinear):
            m.active = k


class _Adam:
    """AdamW (weight decay 0, torch's defaults otherwise) over stacked parameters with one learning rate per
    adapter block (the leading axis): torch's update written out, ``lr[k]`` scaling block k's step."""

    def __init__(self, params: Sequence[torch.Tensor], lrs: Sequence[float], betas=(0.9, 0.999), eps=1e-8) -> None:
        self.params = list(params)
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.lr = torch.tensor(lrs, dtype=self.params[0].dtype, device=self.params[0].device)
        self.betas, self.eps, self.t = betas, eps, 0

    def zero_grad(self, set_to_none: bool = True) -> None:  # torch.optim's signature; grads are always dropped
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        bias1, bias2_sqrt = 1 - beta1 ** self.t, math.sqrt(1 - beta2 ** self.t)
        step_size = self.lr / bias1
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / bias2_sqrt).add_(self.eps)
            p.sub_(m / denom * step_size.view(-1, *([1] * (p.dim() - 1))))


def _lane_key(job: StackedJob, shared: LLM) -> str:
    """Jobs with the same key train identically up to the shorter one's step count (same start, data, seed, lr,
    no validation set) and so share one block of rows."""
    if job.val:
        return f"own:{id(job)}"
    return lora.adapter_key(job_start(shared, job), job.seqs, dataclasses.replace(job.spec, steps=1))


def train_stacked(start: LLM, jobs: Sequence[StackedJob], base: LLM | None = None, eval_every: int = 0,
                  desc: str = "stacked LoRA", progress: bool = True) -> list[str]:
    """Train every job's adapter not yet in the cache, all at once; returns the jobs' adapter keys.

    ``start`` is the shared frozen model; a job with a ``start`` of its own fine-tunes that model (the shared one
    plus a frozen LoRA). Afterwards ``lora.finetune(job_start(start, job).llm, job.seqs, job.spec, base, val=job.val,
    eval_every=eval_every)`` reloads each adapter from the cache. ``base`` (default: each job's start model)
    supplies the bottom residual, as in ``finetune``.
    """
    spec = _check_group(jobs)
    starts = [job_start(start, j) for j in jobs]
    for s_llm in {id(m): m for m in starts}.values():
        bottom = s_llm if base is None else base
        if bottom is not s_llm and not lora.same_bottom(s_llm.model, bottom.model, spec.first_layer):
            raise LLMError(f"start model differs from the base model below the cut (layer {spec.first_layer})")
    if any(j.val for j in jobs) and eval_every < 1:
        raise LLMError("train_stacked: validation sets need eval_every >= 1 (steps between validation losses)")
    keys = [job_key(start, j, eval_every) for j in jobs]
    todo = [i for i, key in enumerate(keys)
            if not all((lora.adapter_dir(starts[i], key) / f).is_file() for f in ("adapter.safetensors", "meta.json"))]
    if not todo:
        return keys
    # lanes: one block of rows per distinct training run; a lane's jobs differ only in their step count
    lane_of: dict[str, int] = {}
    lanes: list[list[int]] = []  # job indices (into ``todo``) per lane
    for t, i in enumerate(todo):
        lane = lane_of.setdefault(_lane_key(jobs[i], start), len(lanes))
        if lane == len(lanes):
            lanes.append([])
        lanes[lane].append(t)
    group = [jobs[i] for i in todo]
    lead = [group[members[0]] for members in lanes]  # each lane's data, seed, lr and start
    n_lanes, batch = len(lanes), spec.batch_size
    steps_total = max(j.spec.steps for j in group)
    inits = [_initial_lora(start, j.spec) for j in lead]
    model = copy.deepcopy(start.model).requires_grad_(False)
    modules = _wrap(model, inits, spec, [start_lora(start, j.start) for j in lead])
    params = [p for m in modules.values() for p in (m.lora_a, m.lora_b)]
    n_trainable = sum(p[0].numel() for p in params)  # one adapter's
    lrs = [j.spec.lr for j in lead]
    # one lr (every stack but a recipe search): torch's AdamW, as lora.finetune uses it (its multi-tensor kernels
    # are faster on a GPU than the written-out update); several: the per-adapter update
    optimiser = (torch.optim.AdamW(params, lr=lrs[0], weight_decay=0.0) if len(set(lrs)) == 1 else _Adam(params, lrs))
    device = next(model.parameters()).device

    def bottom_of(j: StackedJob) -> LLM:
        return job_start(start, j) if base is None else base

    resids = [lora.bottom_resid(bottom_of(j), j.seqs, spec.first_layer) for j in lead]
    widths = [max(len(s.ids) for s in j.seqs) for j in lead]
    masks = [lora.loss_mask(j.seqs, w) for j, w in zip(lead, widths)]
    targets = [lora.loss_targets(j.seqs, w) for j, w in zip(lead, widths)]
    lengths = [torch.tensor([len(s.ids) for s in j.seqs]) for j in lead]
    generators = [torch.Generator().manual_seed(j.spec.seed) for j in lead]
    orders: list[list[int]] = [[] for _ in lead]
    losses: list[list[float]] = [[] for _ in lead]
    vals = None
    if lead[0].val:
        vals = []
        for j in lead:
            w = max(len(q.ids) for q in j.val)
            vals.append((lora.bottom_resid(bottom_of(j), j.val, spec.first_layer), lora.loss_mask(j.val, w),
                         lora.loss_targets(j.val, w)))
    val_curves: list[list[list[float]]] = [[] for _ in lead]
    # with validation sets: the lane's best evaluated state (every lane is evaluated at its last step, so there is
    # one); without: each job's state at its own last step
    best: list[tuple[float, int, dict[str, torch.Tensor]] | None] = [None] * n_lanes
    final: dict[int, dict[str, torch.Tensor]] = {}  # job (index into group) -> its state at its own last step

    def due(k: int, step: int) -> bool:
        """Lane k measures its validation loss at ``step`` (as finetune does: 0, every eval_every, the last)."""
        steps = lead[k].spec.steps
        return step == 0 or step == steps or (step < steps and step % eval_every == 0)

    def validate(step: int) -> None:
        for k, (v_resid, v_mask, v_targets) in enumerate(vals):
            if not due(k, step):
                continue
            _set_active(model, k)
            v = lora.held_out_loss(model, v_resid, spec.first_layer, v_mask, v_targets, chunk=16)
            val_curves[k].append([step, v])
            if step > 0 and (best[k] is None or v < best[k][0]):
                best[k] = (v, step, _state(modules, k))
        _set_active(model, None)

    if vals is not None:
        validate(0)
    started = time.perf_counter()
    d_model = resids[0].shape[-1]
    with torch.enable_grad():
        bar = tqdm(range(steps_total), desc=f"{desc} x{len(group)}", leave=False, disable=not progress)
        for step in bar:
            picks = []
            for k in range(n_lanes):
                if len(orders[k]) < batch:
                    orders[k] += torch.randperm(len(lead[k].seqs), generator=generators[k]).tolist()
                picks.append(orders[k][:batch])
                orders[k] = orders[k][batch:]
            n = max(int(lengths[k][idx].max()) for k, idx in enumerate(picks))
            resid = torch.zeros((n_lanes * batch, n, d_model), dtype=resids[0].dtype)
            mask = torch.zeros((n_lanes * batch, n), dtype=torch.bool)
            target = torch.zeros((n_lanes * batch, n), dtype=torch.long)
            for k, idx in enumerate(picks):
                w = min(n, widths[k])
                rows = slice(k * batch, (k + 1) * batch)
                resid[rows, :w], mask[rows, :w], target[rows, :w] = (
                    resids[k][idx, :w], masks[k][idx, :w], targets[k][idx, :w])
            resid, mask, target = resid.to(device), mask.to(device), target.to(device)
            with only_blocks(model, spec.first_layer) as inner:
                hidden = inner(inputs_embeds=resid, use_cache=False).last_hidden_state
            token_loss = torch.nn.functional.cross_entropy(unembed(model, hidden[mask]).float(), target[mask],
                                                           reduction="none")
            owner = (torch.arange(n_lanes * batch, device=device) // batch)[:, None].expand_as(mask)[mask]
            per_lane = torch.zeros(n_lanes, device=device).index_add_(0, owner, token_loss) / torch.bincount(
                owner, minlength=n_lanes)
            optimiser.zero_grad(set_to_none=True)
            per_lane.sum().backward()
            optimiser.step()
            for k, value in enumerate(per_lane.detach().cpu().tolist()):
                losses[k].append(float(value))
            if vals is None:
                for k, members in enumerate(lanes):
                    for t in members:
                        if group[t].spec.steps == step + 1:
                            final[t] = _state(modules, k)
            elif any(due(k, step + 1) for k in range(n_lanes)):
                with torch.no_grad():
                    validate(step + 1)
    group_s = time.perf_counter() - started
    for k, members in enumerate(lanes):
        for t in members:
            job, i = group[t], todo[t]
            state = best[k][2] if best[k] is not None else final[t]
            meta = {"spec": job.spec.as_dict(), "losses": losses[k][:job.spec.steps],
                    "train_s": group_s / len(group), "step_s": group_s / len(group) / job.spec.steps,
                    "n_sequences": len(job.seqs), "n_tokens_trained": int(masks[k].sum()),
                    "start_model": starts[i].sha256, "n_trainable": n_trainable, "version": lora.LORA_VERSION,
                    "stacked": {"group_size": len(group), "lanes": n_lanes, "steps": steps_total,
                                "group_seconds": group_s, "device": str(device)}}
            if best[k] is not None:
                meta.update(val_curve=val_curves[k], best_step=best[k][1], best_val_loss=best[k][0])
            lora.save_adapter(lora.adapter_dir(starts[i], keys[i]), state, meta)
    return keys


# --------------------------------------------------------------------------------------------
# Sampling K adapters at once


@torch.inference_mode()
def generate_stacked(start: LLM, states: Sequence[dict[str, torch.Tensor]], spec: lora.LoraSpec,
                     prompts: Sequence[Sequence[int]], decoding: Decoding,
                     starts: Sequence[lora.Tuned | None] | None = None) -> list[list[list[int]]]:
    """Every adapter's responses to ``prompts`` (peft state dicts ``states`` over ``start``, each over its own
    start model where ``starts`` gives one: a LoRA over ``start``, kept frozen), drawn in shared batches.

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
    starts = [None] * k_adapters if starts is None else list(starts)
    _wrap(model, [dict(s) for s in states], spec, [start_lora(start, st) for st in starts])
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
    keys = [job_key(start, j, eval_every) for j in jobs]
    return sample_adapters(start, keys, spec, prompts, decoding, [j.start for j in jobs])


def sample_adapters(start: LLM, keys: Sequence[str], spec: lora.LoraSpec, prompts: Sequence[Sequence[int]],
                    decoding: Decoding, starts: Sequence[lora.Tuned | None] | None = None) -> dict[str, Decoding]:
    """Sample the cached adapters ``keys`` (trained with ``spec``'s shape over ``start``, or over ``starts[k]``
    where given: a LoRA over ``start``) on ``prompts`` at once and cache the responses where
    ``cached_generate(finetune(<its start>, ...).llm, prompts, <its decoding>)`` finds them.

    Returns each adapter key's decoding: ``decoding`` with :attr:`Decoding.group` set to a digest of the group
    (start model, adapter keys in order, decoding), so these responses are never confused with one model's own
    stream. A group whose responses are all cached already is not drawn again (a resumed run).
    """
    from safetensors.torch import load_file

    if not keys:
        raise LLMError("sample_adapters needs at least one adapter")
    starts = [None] * len(keys) if starts is None else list(starts)
    if len(starts) != len(keys):
        raise LLMError(f"sample_adapters: {len(starts)} start models for {len(keys)} adapters")
    own = [start if st is None else st.llm for st in starts]
    ident: dict = {"start": start.sha256, "adapters": list(keys), "decoding": decoding.as_dict()}
    if any(st is not None for st in starts):
        ident["starts"] = [m.sha256 for m in own]
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
    grouped = dataclasses.replace(decoding, group=digest)
    tuned = [dataclasses.replace(m, sha256=lora.tuned_sha256(m, key)) for m, key in zip(own, keys)]
    if all(has_generated(t, prompts, grouped) for t in tuned):
        return dict.fromkeys(keys, grouped)
    files = [lora.adapter_dir(m, key) / "adapter.safetensors" for m, key in zip(own, keys)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise LLMError(f"sample_adapters: adapter not trained yet: {missing[0]} (train_stacked or finetune first)")
    device = next(start.model.parameters()).device
    states = [{k: v.to(device) for k, v in load_file(f).items()} for f in files]
    responses = generate_stacked(start, states, spec, prompts, grouped, starts)
    for t, r in zip(tuned, responses):
        store_generated(t, prompts, grouped, r)
    return dict.fromkeys(keys, grouped)
