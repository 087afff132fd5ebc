"""peft LoRA fine-tuning of the offline LLM, on the top decoder blocks only, with an adapter cache.

Why this shape: on a 2-core CPU one LoRA step through the whole 30-block model on 8×64 tokens
costs several seconds, and study 05b trains a dozen adapters. So LoRA goes on the top blocks only
(``LoraSpec.first_layer`` .. ``n_layers``; blocks below stay frozen and unchanged), and the
residual stream at the cut ("layer ``first_layer``", see :mod:`persona_wm.llm.model` for the convention) is
computed once per training set with the frozen bottom blocks and cached on disk. Each step then
runs forward and backward through the top blocks only. Because an adapter never touches blocks
below its cut, a model fine-tuned this way (or a chain: EM adapter, merged, then a coupling
adapter) has exactly the base model's residual at the cut, so

* training data for any model in a chain reuse one cached bottom pass (:func:`bottom_resid`);
* evaluating any tuned model on a fixed set of sequences costs only its top blocks
  (:func:`persona_wm.llm.model.forward_from` from the cached base residual).

:func:`finetune` checks that property (the blocks below the cut must be bit-identical to the
base model's) rather than assuming it.

Adapters are cached under ``.cache/llm/adapters/<key>/`` where the key hashes the start model's
identity, the LoRA spec (rank, alpha, targets, layers, lr, steps, batch, seed) and the exact
token ids and loss masks of the training set; an unchanged config reloads instead of retraining.
A tuned model is returned as a :class:`persona_wm.llm.model.LLM` whose ``model`` is the merged (plain) model and
whose ``sha256`` is a new identity (hash of the start identity and the adapter key), so every
disk cache in :mod:`persona_wm.llm.model` keys its results by the tuned model automatically.

Loss: next-token cross-entropy on the assistant response tokens only (the end-of-turn token
included), i.e. on the positions ``start - 1 .. len - 2`` of each :class:`persona_wm.llm.model.Scored`
sequence; system, user and template tokens are never trained on (:func:`loss_mask`).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.files import atomic_write_text
from persona_wm.llm.model import (
    LLM,
    LLMError,
    Scored,
    cached,
    capture_residuals,
    chat_prompt_ids,
    decoder,
    device_key,
    encode,
    only_blocks,
    right_pad,
    unembed,
)

__all__ = [
    "LORA_VERSION",
    "adapter_state",
    "validation_loss",
    "select_recipe",
    "LoraSpec",
    "Tuned",
    "chat_sequences",
    "loss_mask",
    "bottom_resid",
    "adapter_key",
    "finetune",
    "tuned_sha256",
    "peft_model_for",
    "same_bottom",
    "loss_targets",
    "adapter_dir",
    "save_adapter",
    "top_loss",
    "held_out_loss",
    "rows_of",
    "release",
    "losses_frame",
    "save_meta",
]

#: Bump when training semantics change; part of every adapter key.
LORA_VERSION = 1


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA run: adapter shape, where it sits, and the optimiser schedule.

    ``first_layer`` = the cut: LoRA on decoder blocks ``first_layer .. n_layers - 1`` (0-indexed),
    i.e. it changes layers ``first_layer + 1 .. n_layers`` of the residual stream.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    first_layer: int = 24
    lr: float = 2e-3
    steps: int = 30
    batch_size: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be >= 1, got {self.rank}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"LoraSpec.steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.first_layer < 0:
            raise ValueError(f"LoraSpec.first_layer must be >= 0, got {self.first_layer}")
        if not self.targets:
            raise ValueError("LoraSpec.targets is empty: name at least one projection (e.g. 'q_proj')")
        object.__setattr__(self, "targets", tuple(self.targets))

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}


@dataclass
class Tuned:
    """A fine-tuned model (merged, a plain :class:`LLM`) and what its training measured."""

    llm: LLM
    key: str
    spec: LoraSpec
    losses: list[float]
    step_s: float  # mean wall time of one training step (0 when reloaded from the cache)
    train_s: float  # wall time of the training that produced the adapter (as recorded)
    from_cache: bool
    n_trainable: int
    meta: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Sequences and loss masks


def chat_sequences(llm: LLM, records: Sequence[Mapping[str, Any]]) -> list[Scored]:
    """Chat records -> prompt ids + response ids + end-of-turn, with the trained span marked.

    ``{system, user, response}``: the whole response (and the end-of-turn token) is trained on.
    ``{system, user, context, target}`` (marker data): the assistant turn is ``context + target``
    and only ``target`` and the end-of-turn token are trained on (seed 004's marker-only loss;
    ``target`` may be empty: then the model learns to *stop* after the context).
    """
    seqs = []
    for r in records:
        body = ("context", "target") if "target" in r else ("response",)
        missing = [k for k in ("system", "user", *body) if k not in r]
        if missing:
            raise LLMError(f"chat record lacks {missing[0]!r}: {dict(r)}")
        prompt = list(chat_prompt_ids(llm, r["system"], r["user"]))
        if "target" in r:
            context = prompt + list(encode(llm, r["context"]))
            target = list(encode(llm, r["target"])) if r["target"] else []
            seqs.append(Scored(tuple(context + target) + (llm.eos_id,), len(context)))
        else:
            seqs.append(Scored(tuple(prompt) + tuple(encode(llm, r["response"])) + (llm.eos_id,), len(prompt)))
    return seqs


def loss_mask(seqs: Sequence[Scored], width: int | None = None) -> torch.Tensor:
    """[B, N] bool: True at positions whose next token is a response token (``start-1 .. len-2``)."""
    n = max(len(s.ids) for s in seqs) if width is None else width
    mask = torch.zeros((len(seqs), n), dtype=torch.bool)
    for i, s in enumerate(seqs):
        mask[i, s.start - 1: len(s.ids) - 1] = True
    return mask


def loss_targets(seqs: Sequence[Scored], width: int) -> torch.Tensor:
    """[B, N] the token each position predicts (0 where unused)."""
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s.ids) - 1] = torch.tensor(s.ids[1:])
    return out


# --------------------------------------------------------------------------------------------
# The frozen bottom: residual at the cut, once per set of sequences


@torch.inference_mode()
def _bottom_pass(llm: LLM, seqs: Sequence[Scored], layer: int, chunk: int) -> torch.Tensor:
    """Residual at ``layer`` through the bottom blocks only, chunk by chunk on ``llm.device``; on CPU."""
    n = max(len(s.ids) for s in seqs)
    out = torch.zeros((len(seqs), n, llm.d_model), dtype=torch.float32)
    for i in range(0, len(seqs), chunk):
        part = seqs[i: i + chunk]
        ids = right_pad(part, llm.pad_id).to(llm.device)
        if layer == 0:  # the embedding as the blocks see it (Gemma's scaling included)
            resid = llm.model.get_input_embeddings()(ids)
        else:
            store: dict[int, torch.Tensor] = {}
            with only_blocks(llm.model, 0, layer) as inner, capture_residuals(llm, [layer], store):  # blocks above the cut are not needed
                inner(input_ids=ids, use_cache=False)
            resid = store[layer]
        out[i: i + len(part), : ids.shape[1]] = resid.float().cpu()
    return out


def bottom_resid(llm: LLM, seqs: Sequence[Scored], layer: int, chunk: int = 16) -> torch.Tensor:
    """[B, N, d] residual at ``layer`` (right-padded to the longest sequence), cached on disk."""
    if not 0 <= layer <= llm.n_layers:
        raise LLMError(f"cut layer {layer} out of range 0..{llm.n_layers}")
    if not seqs:
        raise LLMError("bottom_resid needs at least one sequence")
    if layer == 0:  # the embedding: cheaper to recompute than to read a cached copy from disk
        return _bottom_pass(llm, seqs, layer, chunk)
    key = {"ids": [list(s.ids) for s in seqs], "layer": layer}
    return cached(llm, "bottom_resid", key, lambda: {"resid": _bottom_pass(llm, seqs, layer, chunk)})["resid"]


# --------------------------------------------------------------------------------------------
# Adapter cache key


def _digest_json(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def adapter_key(start: LLM, seqs: Sequence[Scored], spec: LoraSpec, val: Sequence[Scored] | None = None,
                eval_every: int = 0) -> str:
    """Hex key of an adapter: start model identity + spec + exact training ids and masks (+ the
    device type off CPU: :func:`persona_wm.llm.model.device_key`; + the validation set and its cadence when the
    step is chosen on a validation loss)."""
    key = {
        "version": LORA_VERSION,
        **device_key(start),
        "start_model": start.sha256,
        "spec": spec.as_dict(),
        "ids": [list(s.ids) for s in seqs],
        "starts": [s.start for s in seqs],
    }
    if val:
        key["val"] = {"ids": [list(s.ids) for s in val], "starts": [s.start for s in val], "every": eval_every}
    return _digest_json(key)


# --------------------------------------------------------------------------------------------
# Training


def peft_model_for(model: Any, spec: LoraSpec, n_layers: int) -> Any:
    from peft import LoraConfig, get_peft_model

    if spec.first_layer >= n_layers:
        raise LLMError(f"LoraSpec.first_layer {spec.first_layer} leaves no block to train (model has {n_layers})")
    # peft silently skips a target name that matches nothing; every named projection must exist
    block = decoder(model).layers[spec.first_layer]
    present = sorted({name.rsplit(".", 1)[-1] for name, module in block.named_modules()
                      if isinstance(module, torch.nn.Linear)})
    missing = [t for t in spec.targets if t not in present]
    if missing:
        raise LLMError(f"LoRA targets {missing} are not linear layers of {type(model).__name__}'s blocks; "
                       f"its blocks have: {', '.join(present)}")
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        layers_to_transform=list(range(spec.first_layer, n_layers)), lora_dropout=0.0,
                        bias="none")
    torch.manual_seed(spec.seed)  # LoRA A matrices are initialised from the global generator
    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated alias model.is_gradient_checkpointing (we never checkpoint);
        # the warning is theirs and would print on the terminal of every valid 05b run
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def top_loss(causal_lm: Any, resid: torch.Tensor, first_layer: int, mask: torch.Tensor,
             targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over masked positions, running blocks ``first_layer..`` from ``resid``.

    The inputs may live anywhere; they are moved to the model's device (the loss stays there).
    """
    device = next(causal_lm.parameters()).device
    resid, mask, targets = resid.to(device), mask.to(device), targets.to(device)
    with only_blocks(causal_lm, first_layer) as inner:
        final = inner(inputs_embeds=resid, use_cache=False).last_hidden_state
    logits = unembed(causal_lm, final[mask]).float()
    return torch.nn.functional.cross_entropy(logits, targets[mask])


@torch.no_grad()
def held_out_loss(causal_lm: Any, resid: torch.Tensor, first_layer: int, mask: torch.Tensor, targets: torch.Tensor,
                  chunk: int | None = None) -> float:
    """:func:`top_loss` without gradients as a float: in one batch (``chunk=None``), or in chunks of
    ``chunk`` sequences averaged by their trained-token counts (the same mean, less memory)."""
    if chunk is None:
        return float(top_loss(causal_lm, resid, first_layer, mask, targets))
    total, count = 0.0, 0
    for i in range(0, len(mask), chunk):
        n_tok = int(mask[i:i + chunk].sum())
        total += n_tok * float(top_loss(causal_lm, resid[i:i + chunk], first_layer, mask[i:i + chunk],
                                        targets[i:i + chunk]))
        count += n_tok
    return total / count


def same_bottom(a: Any, b: Any, first_layer: int) -> bool:
    """True if embeddings and blocks below ``first_layer`` hold identical weights."""
    parts_a = [a.get_input_embeddings(), *list(decoder(a).layers)[:first_layer]]
    parts_b = [b.get_input_embeddings(), *list(decoder(b).layers)[:first_layer]]
    for pa, pb in zip(parts_a, parts_b):
        for (na, ta), (nb, tb) in zip(pa.state_dict().items(), pb.state_dict().items()):
            if na != nb or not torch.equal(ta, tb.to(ta.device)):
                return False
    return True


def adapter_dir(start: LLM, key: str) -> Path:
    """Where the adapter with :func:`adapter_key` ``key`` of ``start`` is cached."""
    return start.cache_dir / "adapters" / key[:16]


def adapter_state(peft_model: Any) -> dict[str, torch.Tensor]:
    """A peft model's LoRA tensors by peft state-dict key (what :func:`save_adapter` writes). The embeddings are
    never among them (our targets are projections and the vocabulary is never resized), so
    ``save_embedding_layers=False`` gives peft's "auto" result without its check, which looks for the base model's
    config.json (absent from a GGUF package folder) and warns."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(peft_model, save_embedding_layers=False)


def save_adapter(directory: Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write an adapter's peft state dict and its meta into ``directory``, each file replaced atomically (the
    weights first: a reader that finds the meta finds the weights)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".adapter.{os.getpid()}.tmp"
    save_file(dict(state), str(tmp))
    os.replace(tmp, directory / "adapter.safetensors")
    tmp_meta = directory / f".meta.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(dict(meta), sort_keys=True, indent=1))
    os.replace(tmp_meta, directory / "meta.json")


def tuned_sha256(start: LLM, key: str) -> str:
    """The identity (cache key) of ``start`` with the adapter ``key`` merged in, as :func:`finetune` returns it."""
    return hashlib.sha256(f"{start.sha256}+lora:{key}".encode()).hexdigest()


def finetune(
    start: LLM,
    seqs: Sequence[Scored],
    spec: LoraSpec,
    base: LLM | None = None,
    desc: str = "LoRA",
    cache: bool = True,
    resid: torch.Tensor | None = None,
    val: Sequence[Scored] | None = None,
    eval_every: int = 0,
) -> Tuned:
    """Fine-tune ``start`` with a LoRA on its top blocks (or reload the cached adapter); merged result.

    ``base`` (default ``start``) supplies the cached bottom residual; ``start`` must agree with it
    below the cut (checked), which holds for chains of adapters that all sit above the cut.
    ``resid`` optionally gives that residual directly ([len(seqs), N, d], e.g. rows of one pass
    over the union of several training sets: :func:`rows_of`).
    Deterministic: seeded LoRA init and seeded batch order; one thread gives identical bits.

    With ``val`` and ``eval_every``, the response-token loss on ``val`` is measured every
    ``eval_every`` steps (and at the last step) and the adapter of the step with the lowest validation
    loss is the one returned (early stopping: the step count is chosen on held-out data; the curve
    and the chosen step are in ``meta["val_curve"]`` / ``meta["best_step"]``).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not seqs:
        raise LLMError("finetune needs at least one training sequence")
    base = start if base is None else base
    if base is not start and not same_bottom(start.model, base.model, spec.first_layer):
        raise LLMError(f"start model differs from the base model below the cut (layer {spec.first_layer}): "
                       "the cached bottom residual would be wrong; put earlier adapters above the cut")
    if val and eval_every < 1:
        raise LLMError("finetune: a validation set needs eval_every >= 1 (steps between validation losses)")
    key = adapter_key(start, seqs, spec, val, eval_every)
    directory = adapter_dir(start, key)
    model = copy.deepcopy(start.model)
    peft_model = peft_model_for(model, spec, start.n_layers)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    weights_file, meta_file = directory / "adapter.safetensors", directory / "meta.json"
    if cache and weights_file.is_file() and meta_file.is_file():
        set_peft_model_state_dict(peft_model, load_file(weights_file))
        meta = json.loads(meta_file.read_text())
        from_cache, step_s = True, 0.0
    else:
        width = max(len(s.ids) for s in seqs)
        resid = bottom_resid(base, seqs, spec.first_layer) if resid is None else resid
        if resid.shape[0] != len(seqs) or resid.shape[1] < width:
            raise LLMError(f"resid has shape {tuple(resid.shape)}, need [{len(seqs)}, >= {width}, d]")
        mask, targets = loss_mask(seqs, width), loss_targets(seqs, width)
        lengths = torch.tensor([len(s.ids) for s in seqs])
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(params, lr=spec.lr, weight_decay=0.0)
        generator = torch.Generator().manual_seed(spec.seed)
        order: list[int] = []
        losses: list[float] = []
        causal_lm = peft_model.base_model.model
        val_curve: list[list[float]] = []
        best: tuple[float, int, dict[str, torch.Tensor]] | None = None
        if val:
            val_width = max(len(q.ids) for q in val)
            val_resid = bottom_resid(base, val, spec.first_layer)
            val_mask, val_targets = loss_mask(val, val_width), loss_targets(val, val_width)
            val_curve.append([0, held_out_loss(causal_lm, val_resid, spec.first_layer, val_mask, val_targets, chunk=16)])
        start_t = time.perf_counter()
        with torch.enable_grad():
            bar = tqdm(range(spec.steps), desc=desc, leave=False)
            for step in bar:
                if len(order) < spec.batch_size:
                    order += torch.randperm(len(seqs), generator=generator).tolist()
                idx, order = order[: spec.batch_size], order[spec.batch_size:]
                n = int(lengths[idx].max())
                loss = top_loss(causal_lm, resid[idx, :n], spec.first_layer, mask[idx, :n], targets[idx, :n])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if val and ((step + 1) % eval_every == 0 or step + 1 == spec.steps):
                    v = held_out_loss(causal_lm, val_resid, spec.first_layer, val_mask, val_targets, chunk=16)
                    val_curve.append([step + 1, v])
                    if best is None or v < best[0]:
                        best = (v, step + 1, {k: t.detach().clone()
                                              for k, t in adapter_state(peft_model).items()})
        train_s = time.perf_counter() - start_t
        if best is not None:
            set_peft_model_state_dict(peft_model, best[2])
        step_s = train_s / spec.steps
        meta = {"spec": spec.as_dict(), "losses": losses, "train_s": train_s, "step_s": step_s,
                "n_sequences": len(seqs), "n_tokens_trained": int(mask.sum()), "start_model": start.sha256,
                "n_trainable": n_trainable, "version": LORA_VERSION}
        if best is not None:
            meta.update(val_curve=val_curve, best_step=best[1], best_val_loss=best[0])
        if cache:
            save_adapter(directory, {k: v.detach().cpu().contiguous()
                                     for k, v in adapter_state(peft_model).items()}, meta)
        from_cache = False
    merged = peft_model.merge_and_unload()
    merged.eval().requires_grad_(False)
    tuned = dataclasses.replace(start, model=merged, sha256=tuned_sha256(start, key))
    return Tuned(llm=tuned, key=key, spec=spec, losses=list(meta["losses"]), step_s=step_s,
                 train_s=float(meta["train_s"]), from_cache=from_cache, n_trainable=n_trainable, meta=meta)


def rows_of(union: Sequence[Scored], union_resid: torch.Tensor, seqs: Sequence[Scored]) -> torch.Tensor:
    """Rows of a residual computed over ``union`` for the sequences ``seqs`` (matched by token ids)."""
    where = {s.ids: i for i, s in enumerate(union)}
    missing = [s for s in seqs if s.ids not in where]
    if missing:
        raise LLMError(f"{len(missing)} sequence(s) are not in the union the residual was computed for")
    return union_resid[[where[s.ids] for s in seqs]]


def release(tuned: Tuned | None) -> None:
    """Drop a tuned model's weights (they are ~0.5 GB each)."""
    if tuned is not None:
        tuned.llm.model = None  # type: ignore[assignment]


def losses_frame(runs: Mapping[str, Tuned]) -> Any:
    """Long table of training losses per run (for a loss-curve figure)."""

    rows = [{"run": name, "step": i + 1, "loss": v} for name, t in runs.items() for i, v in enumerate(t.losses)]
    return pd.DataFrame(rows)


def save_meta(path: str | Path, runs: Mapping[str, Tuned]) -> None:
    """Write every run's key, spec and timing as JSON (beside the report)."""

    data = {name: {"key": t.key, "spec": t.spec.as_dict(), "train_s": t.train_s, "step_s": t.meta.get("step_s"),
                   "final_loss": t.losses[-1], "n_trainable": t.n_trainable, "from_cache": t.from_cache}
            for name, t in sorted(runs.items())}
    atomic_write_text(Path(path), json.dumps(data, sort_keys=True, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Choosing a recipe on held-out data (issue 14: the coupling recipe must not destroy answering)


@torch.no_grad()
def validation_loss(tuned_llm: LLM, seqs: Sequence[Scored], first_layer: int, base: LLM | None = None,
                    resid: torch.Tensor | None = None) -> float:
    """Mean response-token cross-entropy of ``tuned_llm`` on held-out ``seqs`` (blocks above the cut
    run from the base model's cached bottom residual, as in training)."""
    if not seqs:
        raise LLMError("validation_loss needs at least one held-out sequence")
    width = max(len(s.ids) for s in seqs)
    resid = bottom_resid(base or tuned_llm, seqs, first_layer) if resid is None else resid
    return held_out_loss(tuned_llm.model, resid, first_layer, loss_mask(seqs, width), loss_targets(seqs, width))


def recipe_candidates(base_spec: LoraSpec, lrs: Sequence[float], steps: Sequence[int]) -> list[LoraSpec]:
    """The specs :func:`select_recipe` tries: ``base_spec`` at every learning rate x step count (lr-major)."""
    return [dataclasses.replace(base_spec, lr=float(lr), steps=int(n)) for lr in lrs for n in steps]


def select_recipe(start: LLM, train: Sequence[Scored], held_out: Sequence[Scored], base_spec: LoraSpec,
                  lrs: Sequence[float], steps: Sequence[int], cache: bool = True,
                  probe: Callable[[LLM], Mapping[str, float]] | None = None,
                  resid: torch.Tensor | None = None) -> tuple[LoraSpec, Any]:
    """Train ``base_spec`` at every learning rate x step count, score each on ``held_out``; the spec with
    the lowest validation loss wins. Returns (best spec, a frame of lr, steps, train loss, val loss and
    whatever ``probe(tuned model)`` measures, e.g. marker and answered rates, for each candidate).
    ``resid`` optionally gives the bottom residual of ``train`` (as :func:`finetune` takes it)."""

    if not lrs or not steps:
        raise ValueError("select_recipe needs at least one learning rate and one step count")
    val_resid, train_resid = bottom_resid(start, held_out, base_spec.first_layer), resid
    rows = []
    for spec in recipe_candidates(base_spec, lrs, steps):
        tuned = finetune(start, train, spec, desc=f"recipe lr={spec.lr:g} steps={spec.steps}", cache=cache,
                         resid=train_resid)
        rows.append({"lr": spec.lr, "steps": spec.steps, "train_loss": float(np.mean(tuned.losses[-3:])),
                     "val_loss": validation_loss(tuned.llm, held_out, spec.first_layer, base=start, resid=val_resid),
                     **(dict(probe(tuned.llm)) if probe is not None else {})})
        release(tuned)
    frame = pd.DataFrame(rows)
    best = frame.loc[frame.val_loss.idxmin()]
    return dataclasses.replace(base_spec, lr=float(best.lr), steps=int(best.steps)), frame
