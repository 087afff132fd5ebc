"""Config-driven training of small TransformerLens transformers on samples from a `lib` process.

Choices the seed leaves open, made here once for every study:

* **BOS token.** Inputs are ``[BOS, x_1, ..., x_L]`` with BOS = ``n_tokens`` (an extra input id
  the model never predicts: ``d_vocab = n_tokens + 1``, ``d_vocab_out = n_tokens``). Position t
  (0-based) predicts x_{t+1}, so position 0 predicts the first token from the prior and the final
  position predicts x_{L+1} from the belief after L tokens — the belief the steering experiments
  use. Training sequences are therefore sampled with L + 1 tokens.
* **Architecture.** HookedTransformer with learned absolute positions, pre-LayerNorm ("LN"),
  ReLU MLPs, untied embeddings; sizes from :class:`TrainConfig`.
* **Optimisation.** Adam, linear warm-up then cosine decay to 10% of the peak learning rate (a
  decayed rate is what gets the last fraction of a percent of cross-entropy), fresh samples
  every step from a seeded numpy generator, weights initialised from ``seed``.
* **Evaluation.** On a fixed, seeded evaluation set the model's cross-entropy is computed
  against the *exact* Bayes-optimal next-token distribution of every prefix,
  CE = -sum_x p_opt(x) log p_model(x) (a Rao-Blackwellised estimate: no sampling noise from the
  next token), next to H(p_opt) and the uniform baseline log |X|.

Trained models are cached on disk under ``.cache/models/<hash>.pt`` keyed by a hash of the full
config (model + process + training parameters + a code version), so re-running a report does not
retrain; the thread count and device are not part of the key (they do not change the maths, only
float round-off).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.files import REPO_ROOT, atomic_write
from persona_wm.core.ghmm import GHMM, entropy
from persona_wm.core.sfp import restrict_to_sector
from persona_wm.core.threads import limit_threads
from persona_wm.processes import get_process
from persona_wm.toy.hooks import batched_forward, model_inputs

__all__ = ["TrainConfig", "TrainedModel", "train", "load_or_train", "save_trained", "evaluate", "model_inputs",
           "build_model", "cache_path", "default_device", "cache_key", "cached_trainers", "load_cached"]

#: Bump when the training code changes in a way that changes results; invalidates the cache.
TRAINING_CODE_VERSION = 2  # unchanged by the fine-tuning fields: configs without them hash as before
#: Environment variable naming the model cache directory (a relative path resolves against the repository root);
#: read once, when this module is imported (a kernel started by the runner inherits it).
MODEL_CACHE_ENV = "PERSONA_WM_MODEL_CACHE"
CACHE_DIR = (REPO_ROOT / os.environ[MODEL_CACHE_ENV].strip() if os.environ.get(MODEL_CACHE_ENV, "").strip()
             else REPO_ROOT / ".cache" / "models")
#: Who trained a cached model: ``train()`` one at a time, or ``persona_wm.toy.stacked.train_many`` N at once.
TRAINERS = ("sequential", "stacked")
#: Bump when the stacked trainer changes in a way that changes results; invalidates stacked entries only.
STACKED_TRAINING_CODE_VERSION = 1


ARCHITECTURE_FIELDS = ("context_length", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "act_fn",
                       "normalization_type")


#: process object -> its digest. Keyed by the built process, not its name (a swapped builder gives a new object):
#: the EM organisms' builders return one cached object per name, whose 28 MB of transfer matrices took 20 ms to hash
#: at every cache lookup.
_DIGESTS: weakref.WeakKeyDictionary[GHMM, str] = weakref.WeakKeyDictionary()


def process_digest(name: str) -> str:
    """Hash of a process's *definition* (transfer matrices, initial vector), not just its name.

    Part of every cache key, so that changing what a name means (a bug fix in a process builder,
    a new default knob) can never hand back a model trained on the old process.
    """
    process = get_process(name)
    if process in _DIGESTS:
        return _DIGESTS[process]
    digest = hashlib.sha256()
    for array in (process.transfer, process.initial, process.right):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    _DIGESTS[process] = digest.hexdigest()[:16]
    return _DIGESTS[process]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a trained model (and nothing that does not)."""

    process: str
    context_length: int = 10
    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 2
    d_head: int = 32
    d_mlp: int = 256
    act_fn: str = "relu"
    normalization_type: str = "LN"
    steps: int = 1000
    batch_size: int = 256
    lr: float = 1e-3
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    seed: int = 0
    eval_every: int = 100
    eval_sequences: int = 2048
    snapshot_steps: tuple[int, ...] = field(default_factory=tuple)
    #: Fine-tuning: start from the weights of this (cached) config instead of a fresh init.
    init_from: TrainConfig | None = None
    #: Train only on sequences of this sector of the process (e.g. "(1,0)"); None = the whole process.
    data_sector: str | None = None
    #: Draw training data from this other process (same tokens), e.g. narrow fine-tuning data whose
    #: context statistics differ from pretraining; None = ``process``.
    data_process: str | None = None

    def __post_init__(self) -> None:
        process = get_process(self.process)  # unknown process -> clear error before any work
        data = get_process(self.data_process) if self.data_process is not None else process
        if data.n_tokens != process.n_tokens:
            raise ValueError(f"TrainConfig.data_process {self.data_process!r} has {data.n_tokens} tokens, "
                             f"the model's process {process.n_tokens}")
        if self.data_sector is not None and self.data_sector not in (data.partition_labels or ()):
            raise ValueError(f"TrainConfig.data_sector {self.data_sector!r} is not a sector of {data.name!r}; "
                             f"sectors: {data.partition_labels}")
        if self.init_from is not None and (self.init_from.process != self.process or any(
                getattr(self.init_from, k) != getattr(self, k) for k in ARCHITECTURE_FIELDS)):
            raise ValueError("TrainConfig.init_from must share the process and architecture of the fine-tune")
        for name in ("context_length", "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "batch_size",
                     "eval_every", "eval_sequences"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.steps < 0 or not self.lr > 0:
            raise ValueError(f"TrainConfig needs steps >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")
        object.__setattr__(self, "snapshot_steps", tuple(sorted(set(int(s) for s in self.snapshot_steps))))
        if any(s < 0 or s > self.steps for s in self.snapshot_steps):
            raise ValueError(f"snapshot_steps must lie in [0, steps={self.steps}], got {self.snapshot_steps}")

    def key(self) -> str:
        """Stable hash of the config (a fine-tune's includes its base's) and the code version: the cache key."""
        optional = ("init_from", "data_sector", "data_process")  # absent when unused: older keys stay valid
        fields = {k: v for k, v in asdict(self).items() if not (k in optional and v is None)}
        digests = {"process_digest": process_digest(self.process)}
        if self.data_process is not None:
            digests["data_process_digest"] = process_digest(self.data_process)
        payload = json.dumps({"version": TRAINING_CODE_VERSION, **digests, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass
class TrainedModel:
    """A trained model with its config, training history and optional snapshots."""

    config: TrainConfig
    model: Any  # HookedTransformer
    history: list[dict[str, float | None]]
    snapshots: dict[int, dict[str, torch.Tensor]]
    train_seconds: float
    from_cache: bool = False
    #: Trainer lineage: who trained this model, then its ``init_from`` base, ... (see :func:`cache_key`).
    trainers: tuple[str, ...] = ("sequential",)

    @property
    def trainer(self) -> str:
        return self.trainers[0]

    @property
    def process(self) -> GHMM:
        return get_process(self.config.process)

    @property
    def final_eval(self) -> dict[str, float]:
        return self.history[-1]

    def snapshot_model(self, step: int):
        """A fresh model holding the weights saved at ``step`` (e.g. for probe R^2 vs training)."""
        model = build_model(self.config, self.process, device=next(self.model.parameters()).device)
        model.load_state_dict(self.snapshots[step])
        return model.eval()


def default_device() -> str:
    """``$PERSONA_WM_DEVICE`` (cpu, cuda or auto; set by ``runner --device`` / ``make reports DEVICE=``), else auto:
    cuda when present."""
    wanted = os.environ.get("PERSONA_WM_DEVICE", "auto") or "auto"
    if wanted not in ("cpu", "cuda", "auto"):
        raise ValueError(f"PERSONA_WM_DEVICE must be cpu, cuda or auto, got {wanted!r}")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("PERSONA_WM_DEVICE=cuda but torch sees no CUDA device")
    return "cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu"


def build_model(config: TrainConfig, process: GHMM, device: str | torch.device = "cpu"):
    """A freshly initialised HookedTransformer for ``process`` (seeded by ``config.seed``)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=config.n_layers, d_model=config.d_model, n_heads=config.n_heads, d_head=config.d_head,
        d_mlp=config.d_mlp, act_fn=config.act_fn, normalization_type=config.normalization_type,
        n_ctx=config.context_length + 1, d_vocab=process.n_tokens + 1, d_vocab_out=process.n_tokens,
        seed=config.seed, device=str(device), default_prepend_bos=False,
    )

    with warnings.catch_warnings():  # 3.9 warns that HookedTransformer goes away in 4.0: we pin 3.9
        warnings.simplefilter("ignore", DeprecationWarning)
        return HookedTransformer(cfg)


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    floor = config.final_lr_fraction
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model, process: GHMM, tokens: np.ndarray, batch: int = 4096) -> dict[str, float]:
    """Exact-target cross-entropy of the model on ``tokens`` (``[B, L]``, the contexts fed after BOS).

    Returns model CE, Bayes-optimal CE (entropy of p_opt), uniform CE, their ratio and the gap
    captured = (uniform - model) / (uniform - optimal), all averaged over sequences and positions
    1..L+1 (the final position predicts the token after the context).
    """
    p_opt = process.next_token_probs(process.beliefs(tokens))  # [B, L+1, X]
    log_p = batched_forward(model, tokens, process.n_tokens, batch=batch, output="log_probs").probs
    model_ce = float(np.mean(-(p_opt * log_p).sum(-1)))
    optimal_ce = float(np.mean(entropy(p_opt)))
    uniform_ce = float(np.log(process.n_tokens))
    return {
        "model_ce": model_ce,
        "optimal_ce": optimal_ce,
        "uniform_ce": uniform_ce,
        "ce_ratio": model_ce / optimal_ce,
        "gap_captured": (uniform_ce - model_ce) / (uniform_ce - optimal_ce),
    }


def eval_tokens(config: TrainConfig, process: GHMM) -> np.ndarray:
    """The fixed evaluation contexts of a config (seeded apart from the training stream)."""
    rng = np.random.default_rng([config.seed, 1])
    return process.sample(config.eval_sequences, config.context_length, rng)


def train(config: TrainConfig, device: str | None = None, threads: int | None = None,
          progress: bool = True, cache_dir: Path | None = None, trainer: str | None = None) -> TrainedModel:
    """Train (no cache for this config; a fine-tune's base comes from the cache). See the module docstring.

    A fine-tune (``init_from``) starts from the base's weights with a fresh Adam state and draws its
    batches from ``data_sector`` of the process if given; its evaluation stays on the whole process,
    so the history shows what the narrow data does to general performance. ``trainer``: which cache entry
    of the base to start from (see :func:`load_or_train`).
    """
    if threads:
        limit_threads(threads)
    device = device or default_device()
    process = get_process(config.process)
    data_process = get_process(config.data_process) if config.data_process is not None else process
    if config.data_sector is not None:
        data_process = restrict_to_sector(data_process, config.data_sector)
    torch.manual_seed(config.seed)
    model = build_model(config, process, device)
    if config.init_from is not None:
        base = load_or_train(config.init_from, device=device, threads=threads, cache_dir=cache_dir, progress=progress,
                             trainer=trainer)
        model.load_state_dict(base.model.state_dict())
    trainers = ("sequential",) + (base.trainers if config.init_from is not None else ())
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng([config.seed, 0])
    eval_set = eval_tokens(config, process)
    history: list[dict[str, float]] = []
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    start = time.perf_counter()

    def checkpoint(step: int, loss: float | None) -> None:
        if step in config.snapshot_steps:
            snapshots[step] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if step % config.eval_every == 0 or step == config.steps:
            model.eval()
            history.append({"step": step, "train_loss": loss, **evaluate(model, process, eval_set)})
            model.train()

    bar = tqdm(range(config.steps), desc=f"train {config.process} seed {config.seed}", disable=not progress,
               mininterval=2.0)
    checkpoint(0, None)  # no training loss before the first step
    for step in bar:
        sample = data_process.sample(config.batch_size, config.context_length + 1, rng)
        inputs = model_inputs(sample[:, :-1], process.n_tokens, device)
        targets = torch.as_tensor(sample, dtype=torch.long, device=device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        checkpoint(step + 1, loss.item())
        if history and history[-1]["step"] == step + 1:
            bar.set_postfix(ce_ratio=f"{history[-1]['ce_ratio']:.4f}")
    model.eval()
    return TrainedModel(config, model, history, snapshots, time.perf_counter() - start, trainers=trainers)


def cache_key(config: TrainConfig, trainers: tuple[str, ...] | None = None) -> str:
    """The cache key of ``config`` trained by the lineage ``trainers`` (own trainer first, then the base's ...).

    An all-sequential lineage (the default) keys as :meth:`TrainConfig.key` always has, so existing entries
    stay valid; any stacked trainer in the lineage hashes the lineage and the stacked code version in, so
    models of one config from different trainers are different entries and never stand in for each other.
    """
    depth = len(_chain(config))
    trainers = tuple(trainers) if trainers is not None else ("sequential",) * depth
    if len(trainers) != depth or any(t not in TRAINERS for t in trainers):
        raise ValueError(f"cache_key: trainers must be {depth} of {TRAINERS} (the config, then each base), "
                         f"got {trainers}")
    if all(t == "sequential" for t in trainers):
        return config.key()
    payload = json.dumps({"config_key": config.key(), "trainers": list(trainers),
                          "stacked_version": STACKED_TRAINING_CODE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _chain(config: TrainConfig) -> tuple[TrainConfig, ...]:
    """``config`` and its chain of ``init_from`` bases."""
    chain = [config]
    while chain[-1].init_from is not None:
        chain.append(chain[-1].init_from)
    return tuple(chain)


def cache_path(config: TrainConfig, cache_dir: Path | None = None, trainers: tuple[str, ...] | None = None) -> Path:
    return Path(cache_dir or CACHE_DIR) / f"{config.process}-{cache_key(config, trainers)}.pt"


def _lineage(config: TrainConfig, trainer: str) -> tuple[str, ...]:
    """``trainer`` for ``config`` and every base of its ``init_from`` chain."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    return (trainer,) * len(_chain(config))


def cached_trainers(config: TrainConfig, cache_dir: Path | None = None,
                    trainer: str | None = None) -> tuple[str, ...] | None:
    """The trainer lineage of the entry :func:`load_or_train` loads for ``config`` (None: nothing cached).

    ``trainer`` None: a sequential entry wins over a stacked one, and a fine-tune is looked up for the
    base that would be loaded (an uncached base counts as sequential), so a fine-tune always matches the
    base one analyses. ``trainer`` "sequential" or "stacked": only the entry whose whole lineage (the
    config and each base) was trained that way.
    """
    if trainer is not None:
        lineage = _lineage(config, trainer)
        return lineage if cache_path(config, cache_dir, lineage).exists() else None
    base: tuple[str, ...] = ()
    if config.init_from is not None:
        base = (cached_trainers(config.init_from, cache_dir)
                or ("sequential",) * len(_chain(config.init_from)))
    for name in TRAINERS:
        if cache_path(config, cache_dir, (name,) + base).exists():
            return (name,) + base
    return None


def load_cached(config: TrainConfig, device: str | torch.device | None = None,
                cache_dir: Path | None = None, trainer: str | None = None) -> TrainedModel | None:
    """The cached model of this exact config (see :func:`cached_trainers`, also for ``trainer``), or None."""
    trainers = cached_trainers(config, cache_dir, trainer)
    if trainers is None:
        return None
    device = device or default_device()
    blob = torch.load(cache_path(config, cache_dir, trainers), map_location=device, weights_only=False)
    model = build_model(config, get_process(config.process), device)
    model.load_state_dict(blob["state_dict"])
    return TrainedModel(config, model.eval(), blob["history"], blob["snapshots"], blob["train_seconds"], True,
                        trainers)


def load_or_train(config: TrainConfig, device: str | None = None, threads: int | None = None,
                  cache_dir: Path | None = None, progress: bool = True, trainer: str | None = None) -> TrainedModel:
    """Load the cached model of this exact config, or train it and cache it (atomic write).

    The cache may hold it from ``train()`` or from ``persona_wm.toy.stacked.train_many``: see
    :func:`cached_trainers` for which entry is loaded; ``TrainedModel.trainers`` says which it was.
    ``trainer="sequential"`` loads or trains only an all-sequential lineage (the base too);
    ``"stacked"`` only loads (train those with :func:`persona_wm.toy.stacked.train_many`).
    """
    device = device or default_device()
    cached = load_cached(config, device, cache_dir, trainer)
    if cached is not None:
        return cached
    if trainer == "stacked":
        raise ValueError(f"load_or_train: no stacked entry for {config.process} seed {config.seed}; "
                         "persona_wm.toy.stacked.train_many trains stacked models")
    trained = train(config, device=device, threads=threads, progress=progress, cache_dir=cache_dir, trainer=trainer)
    stacked_base = trained.trainers != ("sequential",) * len(trained.trainers)  # a fine-tune of a stacked base
    save_trained(trained, cache_dir, **({"trainers": list(trained.trainers)} if stacked_base else {}))
    return trained


def save_trained(trained: TrainedModel, cache_dir: Path | None = None, **extra) -> Path:
    """Cache ``trained`` under its key (atomic write); ``extra`` entries join the blob (e.g. the trainer lineage)."""
    blob = {"config": asdict(trained.config),
            "state_dict": {k: v.cpu() for k, v in trained.model.state_dict().items()},
            "history": trained.history, "snapshots": trained.snapshots, "train_seconds": trained.train_seconds,
            **extra}
    path = cache_path(trained.config, cache_dir, trained.trainers)
    return atomic_write(path, lambda handle: torch.save(blob, handle))


def history_frame(models: dict[tuple[str, int], TrainedModel]):
    """Training histories of many models as one tidy frame (process, seed, step, ce_ratio, ...)."""

    return pd.DataFrame([{"process": proc, "seed": seed, **row}
                         for (proc, seed), trained in models.items() for row in trained.history])
