"""Train many toy transformers at once: N models as one stacked model, one forward/backward per step.

:func:`persona_wm.toy.train.train` trains one HookedTransformer at a time. On a GPU such a model is
launch-bound (a few thousand tiny kernels per step), on a CPU it pays TransformerLens' per-op overhead;
training N configs of the same architecture as N copies is wasteful in both places. Here every weight
carries a leading model axis ``[N, ...]`` and each linear map is one batched matmul (``baddbmm``) over
the N models, so a step of N models costs one forward and one backward.

Exactness (what is the same as N calls of ``train()``, what is not):

* **Forward.** :class:`StackedTransformer` computes HookedTransformer's forward for the configs
  :func:`~persona_wm.toy.train.build_model` makes (learned absolute positions, pre-LN with eps =
  ``cfg.eps``, causal attention scaled by ``1 / cfg.attn_scale`` with masked scores -inf, ReLU/GELU
  MLP, final LN, unembed with bias), to float round-off; unsupported HookedTransformer options raise.
* **Init.** The stack is built from N ``build_model(config)`` models, so each model starts from
  exactly its sequential init (a fine-tune from its base's weights, as ``train()`` does).
* **Loss and optimiser.** The loss is the SUM of the per-model mean cross-entropies, so model i's
  gradient is exactly its own. Adam (and its L2 ``weight_decay``, added to the gradient) is
  elementwise, and every model of a group shares ``lr``, warm-up and decay, step count and weight
  decay, so one Adam over the stacked tensors is N independent Adams with ``train()``'s schedule
  (:func:`~persona_wm.toy.train.learning_rate`). Configs that differ in these are trained in
  separate groups (:func:`group_configs`).
* **Data.** Each model draws from its own generator ``default_rng([seed, 0])`` exactly as ``train()``
  does, in the same order (``L + 1`` calls of ``rng.random(batch)`` per step), and tokens are made from
  those uniforms by the same belief recursion as ``GHMM.sample``, vectorised over all models that share a
  data process and over a chunk of steps (:meth:`GHMM.sample_from_uniforms`). Each model therefore sees
  ``train()``'s batches (the same tokens up to a float tie at a cumulative-probability boundary) and
  its data never depends on which other models share its group.
* **Evaluation.** At ``train()``'s evaluation steps (every ``eval_every`` and the last step) each
  model is evaluated on its own fixed set (:func:`~persona_wm.toy.train.eval_tokens`) with the same
  exact-target cross-entropy as :func:`~persona_wm.toy.train.evaluate`, for all due models in one
  stacked forward; history rows have ``train()``'s keys and steps, snapshots its steps.

Results therefore match ``train()`` to float round-off at the first step and diverge only as round-off
grows through training (a different matmul order; weights whose exact gradient is 0, such as the key
biases ``attn.b_K``, follow Adam-normalised round-off in either trainer); bitwise equality is not
promised, statistical equivalence is tested (``tests/integration/test_stacked.py``).

Speed. On a GPU all models of a group run in one pass and the batches are sampled on the device
(:func:`sample_from_uniforms_torch`), their uniforms drawn in a background thread. On a CPU the step is
bound by fp32 matmuls, not launches, so the models run one per pass (:func:`default_models_per_pass`)
through the same lean forward, sharing one optimiser step, one sampler pass and one evaluation pass; with
T > 1 torch threads the passes run on T Python threads of one intra-op thread each, which fills the cores
(one tiny model's matmuls do not) and computes exactly what one thread computes.
``make bench`` measures both against ``train()`` (``outputs/bench/metrics.json``, ``stacked_training``).

Cache. Each model is saved in ``train()``'s blob format (config, state_dict, history, snapshots,
train_seconds, plus ``trainers``) under its own key. A stacked model's key is **not** its sequential key:
:func:`persona_wm.toy.train.cache_key` hashes the config key together with the trainer lineage (the
trainer of the model, then of its ``init_from`` base, ...) whenever any trainer in it is not
sequential, so every sequential key stays what it was and a sequentially trained and a stacked-trained
model of one config are two entries that are never confused. :func:`persona_wm.toy.train.load_or_train`
loads a stacked entry when no sequential one exists (a sequential one wins when both do) and reports
it in ``TrainedModel.trainers``; a fine-tune's entry is looked up for the base that ``load_or_train``
would load, so a fine-tune always starts from the base a notebook analyses. :func:`train_many` warns
when the models it returns mix trainers.

``train_seconds`` of a stacked model is its group's wall time divided by the group size (so that sums
over models give the total time); the blob's ``stacked`` field keeps the group size and wall time.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.ghmm import GHMM, entropy
from persona_wm.core.sfp import restrict_to_sector
from persona_wm.core.threads import limit_threads
from persona_wm.processes import get_process
from persona_wm.toy.train import (
    ARCHITECTURE_FIELDS,
    TRAINERS,
    TrainConfig,
    TrainedModel,
    build_model,
    default_device,
    eval_tokens,
    learning_rate,
    load_cached,
    load_or_train,
    save_trained,
)

__all__ = [
    "GROUP_FIELDS",
    "SUPPORTED_ACTIVATIONS",
    "StackedStreams",
    "StackedTransformer",
    "causal_attention",
    "data_process",
    "default_models_per_pass",
    "group_configs",
    "make_optimizer",
    "sample_from_uniforms_torch",
    "train_group",
    "train_many",
    "trained_models",
    "training_step",
]

#: Config fields a group shares (besides the process's token count): the architecture and the optimiser
#: schedule, and the evaluation-set size (one stacked evaluation forward).
GROUP_FIELDS = ARCHITECTURE_FIELDS + ("steps", "batch_size", "lr", "warmup_steps", "final_lr_fraction",
                                      "weight_decay", "eval_sequences")
SUPPORTED_ACTIVATIONS = ("relu", "gelu")
#: Elements of one ``[rows, max(states, tokens, L + 1)]`` array the sampler may hold (64 MiB as float64): bounds
#: the chunk of steps sampled at once (beliefs, probabilities, uniforms and tokens of a chunk).
SAMPLER_ELEMENTS = 1 << 23
#: The same bound for the torch sampler on a GPU (1 GiB as float64): it computes all X belief products of a row at
#: once (``[rows, X S]``), so with CPU-sized chunks a 288-state process sampled 2 steps per call and the host spent
#: its time launching the sampler's small kernels; 16x larger chunks make a few calls per group.
SAMPLER_ELEMENTS_CUDA = 1 << 27
#: Elements of the widest activation ``[models, rows, width]`` float32 of one evaluation forward (128 MiB).
EVAL_ELEMENTS = 1 << 25


# --------------------------------------------------------------------------------------------- the model
def _check_supported(cfg) -> None:
    """Raise if a HookedTransformerConfig uses an option the stacked forward does not implement."""
    wanted = {"normalization_type": "LN", "positional_embedding_type": "standard", "attn_only": False,
              "parallel_attn_mlp": False, "use_attn_result": False, "use_split_qkv_input": False,
              "use_attn_in": False, "post_embedding_ln": False, "gated_mlp": False, "final_rms": False,
              "n_key_value_heads": None, "attention_dir": "causal", "use_attn_scale": True,
              "scale_attn_by_inverse_layer_idx": False, "use_normalization_before_and_after": False,
              "attn_scores_soft_cap": -1.0, "output_logits_soft_cap": -1.0, "use_qk_norm": False,
              "use_attention_sinks": False, "num_experts": None, "dtype": torch.float32,
              "original_architecture": None}
    bad = {k: getattr(cfg, k, v) for k, v in wanted.items() if getattr(cfg, k, v) != v}
    if cfg.act_fn not in SUPPORTED_ACTIVATIONS:
        bad["act_fn"] = cfg.act_fn
    if bad:
        raise ValueError(f"StackedTransformer implements HookedTransformer only for {wanted} and act_fn in "
                         f"{SUPPORTED_ACTIVATIONS}; this config has {bad}")


class _StackedBlock(nn.Module):
    def __init__(self, n: int, d: int, heads: int, d_head: int, d_mlp: int) -> None:
        super().__init__()
        hd = heads * d_head

        def p(*shape):
            return nn.Parameter(torch.empty(n, *shape))

        self.ln1_w, self.ln1_b = p(d), p(d)
        self.W_qkv, self.b_qkv = p(d, 3 * hd), p(3 * hd)  # columns: Q heads, K heads, V heads, each (head, d_head)
        self.W_O, self.b_O = p(hd, d), p(d)
        self.ln2_w, self.ln2_b = p(d), p(d)
        self.W_in, self.b_in = p(d, d_mlp), p(d_mlp)
        self.W_out, self.b_out = p(d_mlp, d), p(d)


_BLOCK_COPIES = {"ln1_w": "ln1.w", "ln1_b": "ln1.b", "ln2_w": "ln2.w", "ln2_b": "ln2.b", "b_O": "attn.b_O",
                 "W_in": "mlp.W_in", "b_in": "mlp.b_in", "W_out": "mlp.W_out", "b_out": "mlp.b_out"}
_TOP_COPIES = {"W_E": "embed.W_E", "W_pos": "pos_embed.W_pos", "lnf_w": "ln_final.w", "lnf_b": "ln_final.b",
               "W_U": "unembed.W_U", "b_U": "unembed.b_U"}


def _hooked_names(cfg) -> list[set[str]]:
    """HookedTransformer weight names the stacked layout covers (per block, and the rest)."""
    block = set(_BLOCK_COPIES.values()) | {f"attn.{w}_{c}" for w in ("W", "b") for c in "QKVO"}
    return [{f"blocks.{layer}.{k}" for k in block} for layer in range(cfg.n_layers)] + [set(_TOP_COPIES.values())]


def _stacked_layout(sd: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """One HookedTransformer state dict -> one model's slice of each stacked weight (names as ``named_parameters``).

    Q, K, V are fused into ``W_qkv [d, 3 H D]`` (columns Q heads, K heads, V heads, each ``(head, d_head)``,
    the order of HookedTransformer's own ``(head d_head)`` flattening); ``W_O [H, D, d]`` becomes ``[H D, d]``.
    """
    hd, d = cfg.n_heads * cfg.d_head, cfg.d_model
    out = {name: sd[key] for name, key in _TOP_COPIES.items()}
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        out.update({f"{pre}{name}": sd[pre + key] for name, key in _BLOCK_COPIES.items()})
        out[f"{pre}W_qkv"] = torch.cat([sd[f"{pre}attn.W_{c}"].permute(1, 0, 2).reshape(d, hd) for c in "QKV"], -1)
        out[f"{pre}b_qkv"] = torch.cat([sd[f"{pre}attn.b_{c}"].reshape(hd) for c in "QKV"])
        out[f"{pre}W_O"] = sd[f"{pre}attn.W_O"].reshape(hd, d)
    return out


def _hooked_layout(values: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Inverse of :func:`_stacked_layout`: one model's stacked slices -> HookedTransformer weight names."""
    heads, d_head, d = cfg.n_heads, cfg.d_head, cfg.d_model
    hd = heads * d_head
    out = {key: values[name] for name, key in _TOP_COPIES.items()}
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        out.update({pre + key: values[f"{pre}{name}"] for name, key in _BLOCK_COPIES.items()})
        for j, c in enumerate("QKV"):
            cols = slice(j * hd, (j + 1) * hd)
            out[f"{pre}attn.W_{c}"] = values[f"{pre}W_qkv"][:, cols].reshape(d, heads, d_head).permute(1, 0, 2)
            out[f"{pre}attn.b_{c}"] = values[f"{pre}b_qkv"][cols].reshape(heads, d_head)
        out[f"{pre}attn.W_O"] = values[f"{pre}W_O"].reshape(heads, d_head, d)
    return out


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_scale: float,
                     fused: bool | None = None) -> torch.Tensor:
    """softmax(q k^T / attn_scale, future positions -inf) v over ``[..., T, D]``, HookedTransformer's attention.

    ``fused`` (default: on a CPU) uses torch's fused kernel; otherwise the scores are written out. A GPU's
    fused kernels tile 64 positions, wasteful for contexts of ~11: on the H200 the written-out form was
    the faster of the two for 256 stacked models (65k sequences), on the CPU the fused one.
    """
    if fused if fused is not None else not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / attn_scale)
    length = q.shape[-2]
    future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
    scores = (q @ k.transpose(-1, -2) / attn_scale).masked_fill(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


class StackedTransformer(nn.Module):
    """N HookedTransformers of one architecture as one module; weights ``[N, ...]``.

    Build with :meth:`from_models` (or :meth:`from_state_dicts`), read back with :meth:`state_dicts`.
    ``forward(tokens [N, B, T]) -> logits [N, B, T, d_vocab_out]``: model i sees ``tokens[i]``.
    """

    def __init__(self, cfg, n_models: int) -> None:
        super().__init__()
        _check_supported(cfg)
        self.cfg = cfg
        self.n_models = n_models
        n, d = n_models, cfg.d_model
        self.W_E = nn.Parameter(torch.empty(n, cfg.d_vocab, d))
        self.W_pos = nn.Parameter(torch.empty(n, cfg.n_ctx, d))
        self.blocks = nn.ModuleList(_StackedBlock(n, d, cfg.n_heads, cfg.d_head, cfg.d_mlp)
                                    for _ in range(cfg.n_layers))
        self.lnf_w, self.lnf_b = nn.Parameter(torch.empty(n, d)), nn.Parameter(torch.empty(n, d))
        self.W_U = nn.Parameter(torch.empty(n, d, cfg.d_vocab_out))
        self.b_U = nn.Parameter(torch.empty(n, cfg.d_vocab_out))
        self._template: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_models(cls, models: Sequence) -> StackedTransformer:
        """Stack HookedTransformers that share one architecture (their weights are copied)."""
        if not models:
            raise ValueError("StackedTransformer.from_models needs at least one model")
        return cls.from_state_dicts(models[0].cfg, [m.state_dict() for m in models])

    @classmethod
    def from_state_dicts(cls, cfg, state_dicts: Sequence[dict[str, torch.Tensor]]) -> StackedTransformer:
        """Stack HookedTransformer state dicts of the architecture ``cfg`` (a HookedTransformerConfig)."""
        if not state_dicts:
            raise ValueError("StackedTransformer.from_state_dicts needs at least one state dict")
        keys = list(state_dicts[0])
        for i, sd in enumerate(state_dicts):
            if list(sd) != keys:
                raise ValueError(f"state dict {i} has other keys than state dict 0: not one architecture")
        stacked = cls(cfg, len(state_dicts)).to(state_dicts[0]["embed.W_E"].device)
        per_model = [_stacked_layout(sd, cfg) for sd in state_dicts]
        used = set().union(*(_hooked_names(cfg)))
        unknown = sorted(k for k in keys if k not in used and not k.endswith((".attn.mask", ".attn.IGNORE")))
        if unknown:
            raise ValueError(f"StackedTransformer: state dict keys it does not implement: {unknown}")
        with torch.no_grad():
            for name, param in stacked.named_parameters():
                param.copy_(torch.stack([values[name] for values in per_model]))
        # key order and the non-trainable buffers (attn.mask, attn.IGNORE) of a HookedTransformer state dict
        stacked._template = {k: v.detach().cpu().clone() for k, v in state_dicts[0].items()}
        return stacked

    def state_dicts(self, models: Sequence[int] | None = None) -> list[dict[str, torch.Tensor]]:
        """HookedTransformer state dicts (CPU copies) of ``models`` (default: all), loadable by ``build_model``."""
        out = []
        with torch.no_grad():
            params = dict(self.named_parameters())
            for i in range(self.n_models) if models is None else models:
                values = _hooked_layout({name: p[i] for name, p in params.items()}, self.cfg)
                out.append({k: (values[k].detach().cpu().contiguous().clone() if k in values else v.clone())
                            for k, v in self._template.items()})
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, tokens: torch.Tensor, models: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[n, B, T, d_vocab_out]`` of models ``models`` (index tensor, default all) on ``tokens [n, B, T]``."""
        params = dict(self.named_parameters())
        if models is not None:
            params = {k: v.index_select(0, models) for k, v in params.items()}
        return self.run(params, tokens)

    def chunks(self, size: int) -> list[tuple[slice, dict[str, torch.Tensor]]]:
        """The models in chunks of ``size``, each as leaf tensors that are *views* of this module's weights.

        For training a few models per forward pass (a CPU keeps a chunk's activations in cache): a
        chunk's leaves read the stacked weights (so the optimiser's in-place updates reach them) and
        their ``.grad`` is bound to the matching slice of each stacked weight's ``.grad``, into which
        autograd accumulates in place. Call :meth:`zero_chunk_grads` instead of ``optimizer.zero_grad``.
        """
        for p in self.parameters():
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = torch.zeros_like(p)
        out = []
        for start in range(0, self.n_models, size):
            rows = slice(start, min(start + size, self.n_models))
            leaves = {}
            for name, p in self.named_parameters():
                leaf = p.detach()[rows].requires_grad_()
                leaf.grad = p.grad[rows]
                leaves[name] = leaf
            out.append((rows, leaves))
        return out

    def zero_chunk_grads(self) -> None:
        """Zero the stacked gradients that :meth:`chunks` bound its leaves to (never set them to None)."""
        for name, p in self.named_parameters():
            if p.grad is None:
                raise RuntimeError(f"StackedTransformer: {name}.grad is None (optimizer.zero_grad() sets it so); "
                                   "the chunks' gradients would go nowhere: call chunks() again")
            p.grad.zero_()

    def _ln(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # HookedTransformer's LayerNorm: (x - mean) / sqrt(var + eps) (biased var), then * w + b per model
        if x.shape[0] == 1:  # one model: the fused affine (a CPU trains one model per pass, see chunks())
            return F.layer_norm(x, (x.shape[-1],), w[0], b[0], eps=self.cfg.eps)
        normed = F.layer_norm(x, (x.shape[-1],), eps=self.cfg.eps)
        return torch.addcmul(b.unsqueeze(1), normed, w.unsqueeze(1))

    def run(self, p: dict[str, torch.Tensor], tokens: torch.Tensor) -> torch.Tensor:
        """The forward pass with weights ``p`` (name -> ``[n, ...]``, as :meth:`named_parameters`) on ``tokens [n, B, T]``."""
        cfg = self.cfg
        n, batch, length = tokens.shape
        if length > cfg.n_ctx:
            raise ValueError(f"StackedTransformer: {length} positions, the context holds {cfg.n_ctx}")
        if p["W_E"].shape[0] != n:
            raise ValueError(f"StackedTransformer: tokens for {n} models, weights for {p['W_E'].shape[0]}")
        heads, d_head, rows = cfg.n_heads, cfg.d_head, batch * length
        offsets = torch.arange(n, device=tokens.device).view(n, 1, 1) * cfg.d_vocab
        x = F.embedding(tokens + offsets, p["W_E"].reshape(n * cfg.d_vocab, cfg.d_model))  # [n, B, T, d]
        x = (x + p["W_pos"][:, None, :length]).reshape(n, rows, cfg.d_model)
        act = F.relu if cfg.act_fn == "relu" else F.gelu
        for layer in range(cfg.n_layers):
            b = {k: p[f"blocks.{layer}.{k}"] for k in ("ln1_w", "ln1_b", "W_qkv", "b_qkv", "W_O", "b_O", "ln2_w",
                                                       "ln2_b", "W_in", "b_in", "W_out", "b_out")}
            h = self._ln(x, b["ln1_w"], b["ln1_b"])
            qkv = torch.baddbmm(b["b_qkv"].unsqueeze(1), h, b["W_qkv"])  # [n, rows, 3 H D]
            q, k, v = qkv.view(n * batch, length, 3, heads, d_head).permute(2, 0, 3, 1, 4).unbind(0)
            z = causal_attention(q, k, v, cfg.attn_scale)  # [nB, H, T, D]
            z = z.transpose(1, 2).reshape(n, rows, heads * d_head)
            x = x + torch.baddbmm(b["b_O"].unsqueeze(1), z, b["W_O"])
            h = self._ln(x, b["ln2_w"], b["ln2_b"])
            hidden = act(torch.baddbmm(b["b_in"].unsqueeze(1), h, b["W_in"]))
            x = x + torch.baddbmm(b["b_out"].unsqueeze(1), hidden, b["W_out"])
        h = self._ln(x, p["lnf_w"], p["lnf_b"])
        logits = torch.baddbmm(p["b_U"].unsqueeze(1), h, p["W_U"])
        return logits.view(n, batch, length, cfg.d_vocab_out)


# --------------------------------------------------------------------------------------------- data
def data_process(config: TrainConfig) -> GHMM:
    """The process ``train()`` draws ``config``'s training batches from (``data_process``, ``data_sector``)."""
    process = get_process(config.data_process if config.data_process is not None else config.process)
    return restrict_to_sector(process, config.data_sector) if config.data_sector is not None else process


def sample_from_uniforms_torch(process: GHMM, uniforms: torch.Tensor) -> torch.Tensor:
    """:meth:`GHMM.sample_from_uniforms` in torch (float64) on ``uniforms``' device, for an HMM (``process.hmm``).

    The belief update gathers ``belief @ T(x)`` for the drawn token from all X products (no host
    round trip to split rows by token, which would stall a GPU); same tokens as the numpy version up to a
    float tie at a cumulative-probability boundary.
    """
    if not process.hmm:
        raise ValueError(f"sample_from_uniforms_torch: {process.name!r} is a generalized HMM; use process.sample_from_uniforms")
    length, rows = uniforms.shape

    def as_tensor(array: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(array, dtype=torch.float64, device=uniforms.device)

    n_tokens, n_states = process.n_tokens, process.n_states
    transfer = as_tensor(process.transfer).permute(1, 0, 2).reshape(n_states, n_tokens * n_states)  # [S, X S]
    emission, right = as_tensor(process.emission), as_tensor(process.right)
    belief = as_tensor(process.initial).expand(rows, n_states)
    tokens = torch.empty((rows, length), dtype=torch.long, device=uniforms.device)
    for t in range(length):
        cumulative = (belief @ emission).clamp_min(0.0).cumsum(dim=1)
        draws = uniforms[t] * cumulative[:, -1]
        token = (draws[:, None] >= cumulative).sum(dim=1).clamp_max(n_tokens - 1)
        tokens[:, t] = token
        if t == length - 1:
            break
        moved = (belief @ transfer).view(rows, n_tokens, n_states)
        unnormalised = moved.gather(1, token.view(rows, 1, 1).expand(rows, 1, n_states)).squeeze(1)
        belief = unnormalised / (unnormalised @ right)[:, None]
    return tokens


class StackedStreams:
    """Every model's training batches, ``train()``'s stream for each, made in chunks of steps.

    :meth:`next` returns ``[N, batch, L + 1]`` int64 tokens (on ``device``) for the next step. Each
    model's uniforms come from its own generator in ``train()``'s order; models sharing a data process
    are then sampled in one pass per chunk, with :meth:`GHMM.sample_from_uniforms` (numpy, on a CPU device)
    or :func:`sample_from_uniforms_torch` (on a CUDA device, for HMMs). The chunk length is bounded by
    :data:`SAMPLER_ELEMENTS` (:data:`SAMPLER_ELEMENTS_CUDA` for the torch sampler). With ``prefetch`` the next chunk's uniforms (and, on a CPU device, its
    tokens) are drawn in a background thread while the device trains on the current chunk; the numbers
    drawn are the same either way.
    """

    def __init__(self, configs: Sequence[TrainConfig], device: torch.device | str, prefetch: bool = False,
                 device_sampler: bool | None = None) -> None:
        self.configs = list(configs)
        self.batch = configs[0].batch_size
        self.length = configs[0].context_length + 1
        self.device = torch.device(device)
        self.rngs = [np.random.default_rng([c.seed, 0]) for c in configs]
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(configs):
            groups.setdefault((c.data_process or c.process, c.data_sector), []).append(i)
        self.groups = [(data_process(configs[idx[0]]), idx) for idx in groups.values()]
        hmms = all(p.hmm for p, _ in self.groups)
        if device_sampler and not hmms:
            raise ValueError("StackedStreams: the torch sampler needs HMMs; a generalized HMM is sampled with numpy")
        self.on_device = self.device.type == "cuda" and hmms if device_sampler is None else device_sampler
        width = max(max(p.n_states * (p.n_tokens if self.on_device else 1), p.n_tokens, self.length)
                    for p, _ in self.groups)  # beliefs (x tokens for the torch gather), probabilities, tokens
        rows_per_step = max(len(idx) for _, idx in self.groups) * self.batch  # of the largest sampler pass
        budget = SAMPLER_ELEMENTS_CUDA if self.on_device else SAMPLER_ELEMENTS
        self.chunk_steps = max(1, budget // (rows_per_step * width))
        self.unsampled = configs[0].steps  # steps not yet handed to _draw
        self.chunk: torch.Tensor | None = None
        self.position = 0
        self.sample_seconds = 0.0  # host time spent drawing and sampling (in the background with prefetch)
        self.wait_seconds = 0.0  # time the caller waited for a chunk
        self._pool = ThreadPoolExecutor(max_workers=1) if prefetch else None
        self._future: Future | None = None

    def _take(self) -> int:
        steps = min(self.chunk_steps, self.unsampled)
        self.unsampled -= steps
        return steps

    def _draw(self, steps: int) -> tuple[int, list]:
        """Each group's uniforms ``[models, steps, L + 1, B]`` (for the torch sampler), or its tokens (numpy sampler).

        Per model the uniforms are in the order ``train()`` consumes them: steps, then positions, then rows.
        """
        start = time.perf_counter()
        out = []
        for process, idx in self.groups:
            # pinned memory on a GPU machine, so that the copy does not wait for the queued training steps
            u = torch.empty((len(idx), steps, self.length, self.batch), dtype=torch.float64,
                            pin_memory=self.device.type == "cuda")
            values = u.numpy()
            for j, i in enumerate(idx):
                self.rngs[i].random(out=values[j])
            if not self.on_device:
                flat = values.transpose(2, 0, 1, 3).reshape(self.length, -1)  # rows: (model, step, sequence)
                u = torch.from_numpy(process.sample_from_uniforms(flat))
            out.append(u)
        self.sample_seconds += time.perf_counter() - start
        return steps, out

    def _tokens(self, drawn: tuple[int, list]) -> torch.Tensor:
        start = time.perf_counter()
        steps, parts = drawn
        tokens = torch.empty((len(self.configs), steps, self.batch, self.length), dtype=torch.long,
                             device=self.device)
        for (process, idx), part in zip(self.groups, parts):
            part = part.to(self.device, non_blocking=True)
            if self.on_device:
                flat = part.permute(2, 0, 1, 3).reshape(self.length, -1)  # rows: (model, step, sequence)
                part = sample_from_uniforms_torch(process, flat)
            tokens[idx] = part.view(len(idx), steps, self.batch, self.length)
        self.sample_seconds += time.perf_counter() - start
        return tokens

    def next(self) -> torch.Tensor:
        if self.chunk is None or self.position == self.chunk.shape[1]:
            start = time.perf_counter()
            if self._future is not None:
                drawn = self._future.result()
            else:
                steps = self._take()
                if steps == 0:
                    raise RuntimeError("StackedStreams: every step's batch has been handed out")
                drawn = self._draw(steps)
            self._future = None
            if self._pool is not None and self.unsampled > 0:
                self._future = self._pool.submit(self._draw, self._take())
            self.chunk = self._tokens(drawn)
            self.position = 0
            self.wait_seconds += time.perf_counter() - start
        out = self.chunk[:, self.position]
        self.position += 1
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------- evaluation
class _StackedEval:
    """Each model's fixed evaluation set and exact targets; :meth:`__call__` mirrors ``train.evaluate``."""

    def __init__(self, configs: Sequence[TrainConfig], processes: Sequence[GHMM], device,
                 memo: dict | None = None) -> None:
        self.n_tokens = processes[0].n_tokens
        tokens, p_opt, self.constant = [], [], []
        for config, process in zip(configs, processes):
            # what eval_tokens and the exact targets depend on: a fine-tune shares its base's (same process and
            # seed), so ``memo`` (one per train_many call) computes them once for both
            key = (config.process, config.seed, config.eval_sequences, config.context_length)
            entry = memo.get(key) if memo is not None else None
            if entry is None:
                contexts = eval_tokens(config, process)  # [E, L]
                probs = process.next_token_probs(process.beliefs(contexts))  # [E, L+1, X]
                entry = (contexts, probs, float(np.mean(entropy(probs))))
                if memo is not None:
                    memo[key] = entry
            contexts, probs, optimal = entry
            tokens.append(contexts)
            p_opt.append(probs)
            self.constant.append((optimal, float(np.log(process.n_tokens))))
        self.tokens = torch.as_tensor(np.stack(tokens), dtype=torch.long, device=device)  # [N, E, L]
        self.p_opt = torch.as_tensor(np.stack(p_opt), dtype=torch.float64, device=device)  # [N, E, L+1, X]

    @torch.no_grad()
    def __call__(self, model: StackedTransformer, which: list[int]) -> list[dict[str, float]]:
        device = self.tokens.device
        index = torch.as_tensor(which, dtype=torch.long, device=device)
        n, (_, n_seq, length) = len(which), self.tokens.shape
        widest = max(model.cfg.d_mlp, 3 * model.cfg.n_heads * model.cfg.d_head, model.cfg.d_model)
        chunk = max(1, EVAL_ELEMENTS // (n * (length + 1) * widest))
        ce = torch.zeros(n, dtype=torch.float64, device=device)
        for start in range(0, n_seq, chunk):
            contexts = self.tokens.index_select(0, index)[:, start:start + chunk]
            bos = torch.full(contexts.shape[:2] + (1,), self.n_tokens, dtype=torch.long, device=device)
            logits = model(torch.cat([bos, contexts], dim=2), models=None if n == model.n_models else index)
            log_p = torch.log_softmax(logits.double(), dim=-1)
            p_opt = self.p_opt.index_select(0, index)[:, start:start + chunk]
            ce += -(p_opt * log_p).sum(dim=(1, 2, 3))
        model_ce = (ce / (n_seq * (length + 1))).tolist()
        rows = []
        for i, value in zip(which, model_ce):
            optimal, uniform = self.constant[i]
            rows.append({"model_ce": value, "optimal_ce": optimal, "uniform_ce": uniform, "ce_ratio": value / optimal,
                         "gap_captured": (uniform - value) / (uniform - optimal)})
        return rows


# --------------------------------------------------------------------------------------------- training
def group_configs(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Indices of ``configs`` in groups that can share one stacked model (same :data:`GROUP_FIELDS` and token count)."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(configs):
        key = tuple(getattr(c, f) for f in GROUP_FIELDS) + (get_process(c.process).n_tokens,)
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_models_per_pass(device: torch.device | str, n_models: int) -> int:
    """Models per forward/backward pass: all of them on a GPU; one on a CPU.

    On a CPU the step is bound by fp32 matmuls and memory traffic, not by launches: a pass over many
    models makes activations that outgrow the caches (on the 2-core development machine 16 models per
    pass were slower per model-step than 1, and 1 to 4 about equal), and a single model uses the fused
    LayerNorm affine.
    """
    return n_models if torch.device(device).type == "cuda" else 1


def _losses(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each model's mean next-token cross-entropy (``train()``'s loss), ``[n]``."""
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1), reduction="none")
    return per_token.view(tokens.shape[0], -1).mean(dim=1)


def training_step(stacked: StackedTransformer, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
                  n_tokens: int, passes: list | None = None, pool: ThreadPoolExecutor | None = None,
                  workers: int = 1) -> torch.Tensor:
    """One optimiser step of every model on its batch ``tokens [N, B, L + 1]`` (inputs: BOS + the first L).

    The loss is the sum of the models' mean cross-entropies, so each model's gradient is its own.
    ``passes``: :meth:`StackedTransformer.chunks` to run the models a few per forward/backward (the
    gradients land in the stacked weights' ``.grad``); None runs all in one pass. ``pool``: run the passes
    on its threads, ``workers`` interleaved shares of them at once (each pass writes only its own models'
    gradient slices). Returns the per-model losses (detached, on the device: no host sync).
    """
    bos = torch.full(tokens.shape[:2] + (1,), n_tokens, dtype=torch.long, device=tokens.device)
    inputs = torch.cat([bos, tokens[..., :-1]], dim=2)
    if passes is None:
        losses = _losses(stacked(inputs), tokens)
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        out = losses.detach()
    else:
        stacked.zero_chunk_grads()
        out = torch.empty(tokens.shape[0], device=tokens.device)

        def run(share: list) -> None:
            for rows, params in share:
                losses = _losses(stacked.run(params, inputs[rows]), tokens[rows])
                losses.sum().backward()
                out[rows] = losses.detach()

        if pool is None or workers < 2:
            run(passes)
        else:
            for done in [pool.submit(run, passes[i::workers]) for i in range(workers)]:
                done.result()
    optimizer.step()
    return out


def make_optimizer(stacked: StackedTransformer, config: TrainConfig) -> torch.optim.Adam:
    """``train()``'s Adam (lr, weight_decay of ``config``) over the stacked weights (fused kernels on a GPU)."""
    fused = {"fused": True} if stacked.W_E.device.type == "cuda" else {}
    return torch.optim.Adam(stacked.parameters(), lr=config.lr, weight_decay=config.weight_decay, **fused)


def train_group(configs: Sequence[TrainConfig], device: str | torch.device | None = None,
                bases: Sequence[TrainedModel | None] | None = None, progress: bool = True,
                models_per_pass: int | None = None, eval_memo: dict | None = None) -> tuple[list[TrainedModel], dict]:
    """Train one group (configs sharing :data:`GROUP_FIELDS`) as one stacked model; nothing is cached.

    ``bases``: for fine-tunes, the trained model each starts from (None: its fresh init). Returns the
    trained models and the group's timings (wall seconds, and the seconds spent sampling and evaluating).
    ``eval_memo``: a dict the groups of one :func:`train_many` call share, so that a fine-tune reuses its
    base's evaluation set and exact targets instead of recomputing them (:class:`_StackedEval`).
    """
    configs = list(configs)
    bases = list(bases) if bases is not None else [None] * len(configs)
    if len(group_configs(configs)) != 1:
        raise ValueError(f"train_group: configs must share {GROUP_FIELDS} and the token count; "
                         "train_many groups them")
    if any((b is None) != (c.init_from is None) for b, c in zip(bases, configs)):
        raise ValueError("train_group: give a base model for exactly the configs with init_from")
    device = torch.device(device or default_device())
    _sync(device)
    start = time.perf_counter()
    processes = [get_process(c.process) for c in configs]
    models = []
    for config, process, base in zip(configs, processes, bases):
        torch.manual_seed(config.seed)  # as train() does (build_model seeds its own init from config.seed)
        model = build_model(config, process, device)
        if base is not None:
            model.load_state_dict(base.model.state_dict())
        models.append(model)
    stacked = StackedTransformer.from_models(models).to(device)
    stacked.train()
    first, n = configs[0], len(configs)
    optimizer = make_optimizer(stacked, first)
    per_pass = models_per_pass or default_models_per_pass(device, n)
    passes = stacked.chunks(per_pass) if per_pass < n else None
    streams = StackedStreams(configs, device, prefetch=device.type == "cuda")
    evaluator = _StackedEval(configs, processes, device, eval_memo)
    # On a CPU with T > 1 torch threads the passes run on T Python threads with one intra-op thread each
    # (models are independent; one tiny model does not fill two cores): the numbers are those of a one-thread
    # run, bit for bit, and the step takes both cores. Restored in the ``finally`` below.
    threads = torch.get_num_threads()
    workers = min(threads, len(passes)) if device.type == "cpu" and passes is not None else 1
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    if pool is not None:
        torch.set_num_threads(1)
    histories: list[list[dict]] = [[] for _ in configs]
    snapshots: list[dict[int, dict]] = [{} for _ in configs]
    n_tokens = processes[0].n_tokens
    eval_seconds = 0.0

    def checkpoint(step: int, losses: torch.Tensor | None) -> None:
        nonlocal eval_seconds
        snap = [i for i, c in enumerate(configs) if step in c.snapshot_steps]
        for i, sd in zip(snap, stacked.state_dicts(snap)):
            snapshots[i][step] = sd
        due = [i for i, c in enumerate(configs) if step % c.eval_every == 0 or step == c.steps]
        if due:
            began = time.perf_counter()
            stacked.eval()
            rows = evaluator(stacked, due)
            stacked.train()
            loss_values = losses.tolist() if losses is not None else [None] * n
            for i, row in zip(due, rows):
                histories[i].append({"step": step, "train_loss": loss_values[i], **row})
            eval_seconds += time.perf_counter() - began

    names = ", ".join(sorted({c.process for c in configs}))
    bar = tqdm(range(first.steps), desc=f"train_many {n} x {names}"[:80], disable=not progress, mininterval=2.0)
    try:
        checkpoint(0, None)  # no training loss before the first step
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(first, step)
            losses = training_step(stacked, optimizer, streams.next(), n_tokens, passes, pool, workers)
            checkpoint(step + 1, losses)
    finally:
        streams.close()
        if pool is not None:
            pool.shutdown()
            torch.set_num_threads(threads)
    _sync(device)
    seconds = time.perf_counter() - start
    stacked.eval()
    trained = []
    for config, model, sd, base, history, snaps in zip(configs, models, stacked.state_dicts(), bases, histories,
                                                       snapshots):
        model.load_state_dict(sd)
        trainers = ("stacked",) + (base.trainers if base is not None else ())
        trained.append(TrainedModel(config, model.eval(), history, snaps, seconds / n, trainers=trainers))
    info = {"group_size": n, "group_seconds": seconds, "models_per_pass": per_pass, "parallel_passes": workers,
            "sample_seconds": streams.sample_seconds, "sample_wait_seconds": streams.wait_seconds,
            "eval_seconds": eval_seconds, "device": str(device)}
    return trained, info


def train_many(configs: Sequence[TrainConfig], device: str | None = None, threads: int | None = None,
               progress: bool = True, cache_dir: Path | None = None,
               models_per_pass: int | None = None, only_stacked: bool = False) -> list[TrainedModel]:
    """Make sure every config is trained and cached; train the missing ones stacked. Returns them in order.

    A config with a cache entry (sequential or stacked, as :func:`~persona_wm.toy.train.load_or_train`
    resolves it) is loaded, not retrained. The rest are grouped by :func:`group_configs` and each group
    is trained as one :class:`StackedTransformer`; fine-tunes (``init_from``) wait for their bases (trained
    earlier in the same call if they are missing too) and start from the base ``load_or_train`` would
    load. Each trained model is cached under its stacked key (see the module docstring), so a following
    ``load_or_train(config)`` loads it. Warns when the returned models mix trainers.

    ``models_per_pass``: models per forward/backward pass (default :func:`default_models_per_pass`:
    all on a GPU, one on a CPU); it changes speed only, not what is computed. ``only_stacked``: load only
    entries whose whole lineage was trained stacked (a study whose params say ``trainer: stacked``), so
    what a study analyses never depends on which other entries happen to be in the cache.
    """
    reuse = "stacked" if only_stacked else None
    if threads:
        limit_threads(threads)
    device = torch.device(device or default_device())
    configs = list(configs)
    results: dict[TrainConfig, TrainedModel] = {}
    pending = []
    eval_memo: dict = {}  # evaluation sets and exact targets, computed once per (process, seed, size) in this call
    for config in dict.fromkeys(configs):  # each distinct config once, first-seen order
        cached = load_cached(config, device=device, cache_dir=cache_dir, trainer=reuse)
        if cached is not None:
            results[config] = cached
        else:
            pending.append(config)
    while pending:
        # a fine-tune whose base is still pending waits for the next round
        ready = [c for c in pending if c.init_from is None or c.init_from not in pending]
        bases = {}
        for config in ready:
            if config.init_from is not None:
                base = results.get(config.init_from) or load_cached(config.init_from, device=device,
                                                                     cache_dir=cache_dir, trainer=reuse)
                if base is None:  # a base not asked for and not cached: train it (stacked) first
                    if config.init_from not in pending:
                        pending.append(config.init_from)
                    continue
                bases[config] = base
        ready = [c for c in ready if c.init_from is None or c in bases]
        if not ready:
            continue
        for indices in group_configs(ready):
            group = [ready[i] for i in indices]
            trained, info = train_group(group, device, [bases.get(c) for c in group], progress, models_per_pass,
                                        eval_memo)
            for model in trained:
                save_trained(model, cache_dir, trainers=list(model.trainers), stacked=info)
                results[model.config] = model
        pending = [c for c in pending if c not in results]
    out = [results[c] for c in configs]
    if len({t for m in out for t in m.trainers}) > 1:  # sequential and stacked models (or bases) together
        counts = {" <- ".join(k): sum(m.trainers == k for m in out) for k in {m.trainers for m in out}}
        warnings.warn(f"train_many: the {len(out)} models mix trainers (from the cache and trained now): {counts}",
                      stacklevel=2)
    return out


def trained_models(configs: Sequence[TrainConfig], trainer: str, device: str | None = None,
                   threads: int | None = None, progress: bool = True,
                   cache_dir: Path | None = None) -> list[TrainedModel]:
    """Every config's model as ``trainer`` makes it, from the cache or trained now; in the order of ``configs``.

    ``"stacked"``: :func:`train_many` with ``only_stacked`` (the missing ones trained N at a time);
    ``"sequential"``: :func:`~persona_wm.toy.train.load_or_train` one config after another, loading only
    all-sequential entries. Either way only models of that trainer (and bases of that trainer) are
    returned, so a study's numbers depend on its params, not on what else the cache holds.
    """
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if trainer == "stacked":
        return train_many(configs, device, threads, progress, cache_dir, only_stacked=True)
    return [load_or_train(c, device, threads, cache_dir, progress, trainer="sequential") for c in configs]
