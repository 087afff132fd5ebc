"""Speed measurements of the library (``make bench``), written to a scratch file, ``.cache/bench/metrics.json``;
``--update`` writes the committed ``outputs/bench/metrics.json`` instead (``--output FILE`` anywhere else).

    python -m persona_wm.bench [--sections hmm stacked llm] [--device cpu|cuda|auto] [--ns 1,8,64]
                               [--threads 1,2] [--steps 50] [--seq-models 4] [--output FILE]
    python -m persona_wm.bench --sections cold [--studies 01_sfp_definition,...] [--arms stacked,sequential]

Sections (each writes its own key and its own machine/date/threads metadata under ``meta.<section>``,
and a run merges into the existing file, so a GPU run adds its keys next to the CPU ones):

* ``hmm`` -> ``ghmm_vs_hmmlearn``: the library's batched GHMM forward (per-token probabilities and
  beliefs of every prefix, :meth:`GHMM.forward`) on 20k Mess3 sequences of length 10, against
  hmmlearn's forward algorithm on the same sequences, one ``score`` call per sequence (``speedup``) and
  one call with ``lengths`` (``speedup_vs_lengths``). Mess3 emits from the state it moves to, so it is
  hmmlearn's CategoricalHMM with start = eta P, transitions P and emissions E; the log-likelihoods of both
  are compared (``max_abs_loglik_diff``).
* ``sampler`` -> ``sparse_sampler``: exact sampling of ``em_seq()`` (64k sequences of 9 tokens), the sparse
  chunked path of :meth:`GHMM.sample_from_uniforms` against its dense row-by-row path on the same draws, side
  by side ``--repeats`` times: ``speedup`` is the median ratio with ``speedup_min`` / ``_max``; the tokens must
  be identical.
* ``stacked`` -> ``stacked_training.<device>_t<threads>``: model-steps per second of
  :func:`persona_wm.toy.stacked.train_group` on N models against ``train()`` one model at a time,
  same config (Mess3, the studies' 2-layer d_model 64 architecture, batch 256, evaluations at step 0
  and the last step on 512 sequences), same thread count, measured side by side: for each N, the
  stacked run and then ``train()`` of ``min(N, --seq-models)`` of the same configs (one-at-a-time
  throughput does not depend on N), repeated ``--repeats`` times (default 3): ``speedup_n<N>`` is the
  median ratio, with ``speedup_n<N>_min`` / ``_max``; the rates are those of the median run. Wall clock; on a CPU also CPU time (``speedup_cpu_time_n<N>``, the
  fairer number on a shared machine), the share of the stacked run spent sampling (``sample_fraction``:
  host time drawing and sampling batches, partly in a background thread on a GPU; ``sample_wait_fraction``:
  time the training loop waited for them) and evaluating, and
  ``matmul_ms_per_model_step``: the fp32 matmuls of one model-step alone (forward and both backward
  products of every linear map), the floor no trainer goes below on that device.
* ``llm`` -> ``llm.forward_overhead``: :func:`persona_wm.llm.model.forward` capturing the residual
  stream of every layer (forward hooks) over the same forward with no hooks, 7 interleaved pairs: the
  median ratio with ``forward_overhead_min`` / ``_max`` (1.0 = no overhead); SmolLM2 when its weights package is installed, else (or with
  ``--llm tiny``) a tiny random Llama; ``llm.model`` says which.
* ``study02`` (not run by default) -> ``study02``: study 02's train-or-load and steering timings.
* ``lora_stacked`` (not run by default) -> ``lora_stacked.<device>``: adapter-steps per second of
  :func:`persona_wm.llm.stacked_lora.train_stacked` with K adapters (``--lora-ks``) against
  :func:`persona_wm.llm.lora.finetune` training one adapter alone, same spec (05b's GPU shape: rank 32 on every
  projection of every block, batch 16 sequences of 64 tokens), model as ``--llm``; each ratio is the median of
  ``--repeats`` runs side by side, with its min and max (``speedup_k<K>``, ``speedup_k<K>_min``, ``..._max``), of
  whole calls (copying the model, the bottom residual, saving or merging included) and, as ``loop_speedup_k<K>``,
  of the training loops alone (what a run of many more steps approaches). ``--matmul-precision high`` runs both arms
  with TF32 matmuls on a GPU (``lora_stacked.<device>_tf32``; every study keeps full fp32).
* ``sweep`` (not run by default) -> ``sweep_<params>_grid_<device>``: study 04's grid sweep
  (:func:`persona_wm.studies.persona_engineering_sweep.run_sweep`, params ``--sweep-params``, default ``full``, with
  the driver's default worker count) ``--repeats`` times, each from its own empty model cache: ``wall_s`` and
  ``train_s`` are the medians, with their min, max and every run (``wall_s_runs``, ``train_s_runs``).

* ``cold`` (not run by default; on the 2-core CPU about 11 minutes a repeat for 01-02 with both trainers, 9 for
  03-04 stacked; one model at a time, organism v3's 03 alone takes over an hour) -> ``cold_minutes.<study>``
  (trainer stacked) and ``cold_minutes_sequential.<study>`` (trainer sequential), minutes of a cold ``make
  reports`` of the studies (``--studies``, default 01-04) with empty model caches, side by side
  (:func:`bench_cold`), their total (``total``; ``total_01_02`` for a subset), and ``cold_speedup.<study>`` =
  sequential / stacked; on a GPU the keys end in ``_cuda``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import tokenizers
import torch
import yaml
from tqdm import tqdm  # text bars on stderr: the runner keeps them on the terminal, out of reports

from persona_wm.core.files import REPO_ROOT
from persona_wm.core.threads import limit_threads
from persona_wm.io.params import load_params, notebook_path, parameter_schema
from persona_wm.llm import model as L
from persona_wm.llm.lora import LoraSpec, adapter_dir, finetune
from persona_wm.llm.stacked_lora import StackedJob, train_stacked
from persona_wm.processes import get_process
from persona_wm.studies import persona_engineering_sweep as sweep_driver
from persona_wm.toy.probe import residual_hooks
from persona_wm.toy.stacked import train_group
from persona_wm.toy.steer import partition_frame, steering_frame
from persona_wm.toy.train import MODEL_CACHE_ENV, TrainConfig, build_model, load_or_train, train

OUTPUT = REPO_ROOT / "outputs" / "bench" / "metrics.json"  # the committed numbers: written only with --update
SCRATCH = REPO_ROOT / ".cache" / "bench" / "metrics.json"  # the default destination
#: The settings the committed ratios were measured with, as defaults: training steps per measured run.
DEFAULT_STEPS = {"cpu": 50, "cuda": 300}
SECTIONS = ("hmm", "sampler", "stacked", "llm", "study02", "cold", "lora_stacked", "sweep")
DEFAULT_SECTIONS = ("hmm", "sampler", "stacked", "llm")
STUDY = "02_steering_specificity"


# --------------------------------------------------------------------------------------------- helpers
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device, threads: int | list[int] | None = None) -> dict:
    """Where and when a section ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "load_average_1min": _load(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": threads, "torch": torch.__version__, "python": platform.python_version()}


def _load() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def read_metrics(path: Path = OUTPUT) -> dict:
    return json.loads(Path(path).read_text()) if Path(path).exists() else {}


def write_metrics(metrics: dict, path: Path = OUTPUT) -> None:
    """Atomic write (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(metrics, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------- GHMM vs hmmlearn
def as_categorical_hmm(process):
    """hmmlearn's CategoricalHMM for a GHMM that emits from the state it moves to: T(x)[s, t] = P[s, t] E[t, x]."""
    from hmmlearn.hmm import CategoricalHMM

    if not process.hmm:
        raise ValueError(f"{process.name} is a generalized HMM (negative entries allowed): hmmlearn has no counterpart")
    transitions = process.transfer.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        emission = np.where(transitions[None] > 0, process.transfer / transitions[None], np.nan)  # [x, s, t]
    per_target = np.nanmean(emission, axis=1)  # [x, t]
    if not np.allclose(np.nan_to_num(emission - per_target[:, None, :]), 0.0, atol=1e-12):
        raise ValueError(f"{process.name}: T(x)[s, t] is not P[s, t] E[t, x]; no state-emitting HMM to compare")
    hmm = CategoricalHMM(n_components=process.n_states, n_features=process.n_tokens, init_params="", params="")
    hmm.startprob_ = process.initial @ transitions
    hmm.transmat_ = transitions
    hmm.emissionprob_ = per_target.T
    return hmm


def _spread(key: str, values: list[float]) -> dict[str, float]:
    """A repeated measurement as the bench writes it: the median under ``key``, its min and max beside it."""
    return {key: float(statistics.median(values)), f"{key}_min": float(min(values)), f"{key}_max": float(max(values))}


def bench_hmm(n_sequences: int = 20_000, length: int = 10, seed: int = 0, repeats: int = 3) -> dict:
    """Batched GHMM forward vs hmmlearn's forward algorithm on the same Mess3 sequences: the three calls timed side
    by side ``repeats`` times; ratios are medians with min and max, seconds the medians."""
    process = get_process("mess3")
    tokens = process.sample(n_sequences, length, np.random.default_rng(seed))
    hmm = as_categorical_hmm(process)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        beliefs, token_probs = process.forward(tokens)
        lib_seconds = time.perf_counter() - start
        start = time.perf_counter()
        theirs = np.array([hmm.score(row.reshape(-1, 1)) for row in tokens])
        per_sequence_seconds = time.perf_counter() - start
        start = time.perf_counter()
        total = hmm.score(tokens.reshape(-1, 1), lengths=[length] * n_sequences)
        lengths_seconds = time.perf_counter() - start
        runs.append((lib_seconds, per_sequence_seconds, lengths_seconds))
    ours = np.log(token_probs).sum(axis=1)
    diff = float(np.max(np.abs(ours - theirs)))
    if diff > 1e-8 or abs(total - ours.sum()) > 1e-6 * abs(total):
        raise AssertionError(f"GHMM and hmmlearn log-likelihoods differ: max |diff| {diff:.3g}")
    per_seq = [b / a for a, b, _ in runs]
    per_len = [c / a for a, _, c in runs]
    return {**_spread("speedup", per_seq), **_spread("speedup_vs_lengths", per_len), "repeats": repeats,
            "lib_seconds": statistics.median(r[0] for r in runs),
            "hmmlearn_per_sequence_seconds": statistics.median(r[1] for r in runs),
            "hmmlearn_lengths_seconds": statistics.median(r[2] for r in runs), "max_abs_loglik_diff": diff,
            "n_sequences": n_sequences, "length": length, "process": process.name,
            "lib_call": "GHMM.forward (token probabilities and beliefs)", "beliefs_shape": list(beliefs.shape)}


# --------------------------------------------------------------------------------------------- sampler
def bench_sampler(process_name: str = "em_seq()", n_sequences: int = 65_536, length: int = 9, seed: int = 0,
                  repeats: int = 3) -> dict:
    """Exact sampling of a large sparse HMM: :meth:`GHMM.sample_from_uniforms`' sparse chunked path against its
    dense row-by-row path on the same uniform draws, timed side by side ``repeats`` times (the ratio per pair;
    median with min and max, seconds the medians); the two token arrays must be identical."""
    process = get_process(process_name)
    uniforms = np.random.default_rng(seed).random((length, n_sequences))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        dense = process.sample_from_uniforms(uniforms, sparse=False)
        dense_seconds = time.perf_counter() - start
        start = time.perf_counter()
        sparse = process.sample_from_uniforms(uniforms, sparse=True)
        runs.append((dense_seconds, time.perf_counter() - start))
    if not np.array_equal(dense, sparse):
        raise AssertionError(f"{process_name}: the sparse and dense samplers gave different tokens")
    return {**_spread("speedup", [d / s for d, s in runs]), "repeats": repeats,
            "dense_seconds": statistics.median(d for d, _ in runs),
            "sparse_seconds": statistics.median(s for _, s in runs), "same_tokens": True,
            "process": process.name, "n_states": process.n_states, "n_sequences": n_sequences, "length": length}


# --------------------------------------------------------------------------------------------- stacked training
def bench_config(seed: int, steps: int) -> TrainConfig:
    """The measured workload: the studies' architecture on Mess3, two evaluations (step 0 and the last)."""
    return TrainConfig(process="mess3", steps=steps, batch_size=256, seed=seed, eval_every=steps, eval_sequences=512)


def matmul_floor(config: TrainConfig, device: torch.device, reps: int = 10) -> tuple[float, float]:
    """Wall and CPU seconds of the fp32 matmuls of one model-step alone (every linear map's forward, dX, dW)."""
    rows, d, width = config.batch_size * (config.context_length + 1), config.d_model, config.n_heads * config.d_head
    shapes = [(d, 3 * width), (width, d), (d, config.d_mlp), (config.d_mlp, d)] * config.n_layers
    shapes.append((d, get_process(config.process).n_tokens))
    x = {k: torch.randn(1, rows, k, device=device) for k in {s[0] for s in shapes}}
    w = {s: torch.randn(1, *s, device=device) for s in shapes}
    g = {n: torch.randn(1, rows, n, device=device) for n in {s[1] for s in shapes}}

    def run() -> None:
        for k, n in shapes:
            torch.bmm(x[k], w[(k, n)])
            torch.bmm(g[n], w[(k, n)].transpose(1, 2))
            torch.bmm(x[k].transpose(1, 2), g[n])

    run()
    _, wall, cpu = _timed(lambda: [run() for _ in range(reps)], device)
    return wall / reps, cpu / reps


def _timed(fn, device: torch.device):
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench_stacked(device: torch.device, ns: list[int], threads: int, steps: int, seq_models: int,
                  models_per_pass: int | None = None, repeats: int = 3) -> dict:
    """Stacked vs one-at-a-time training throughput at one thread count (see the module docstring)."""
    limit_threads(threads)
    build_model(bench_config(0, steps), get_process("mess3"), device)  # imports and first-call costs, untimed
    entry: dict = {"threads": threads, "steps": steps, "process": "mess3", "batch_size": 256, "d_model": 64,
                   "n_layers": 2, "eval_sequences": 512}
    on_cpu = device.type == "cpu"
    floor_wall, floor_cpu = matmul_floor(bench_config(0, steps), device)
    entry["matmul_ms_per_model_step"] = 1e3 * floor_wall
    if on_cpu:
        entry["matmul_cpu_ms_per_model_step"] = 1e3 * floor_cpu
    for n in ns:
        configs = [bench_config(seed, steps) for seed in range(n)]
        sequential = configs[:min(n, seq_models)]
        runs = []
        for _ in range(repeats):  # side by side, repeated: the one-at-a-time baseline swings between runs
            (_, info), wall, cpu = _timed(lambda c=configs: train_group(c, device, progress=False,
                                                                        models_per_pass=models_per_pass), device)
            _, seq_wall, seq_cpu = _timed(lambda s=sequential: [train(c, device=str(device), progress=False)
                                                                for c in s], device)
            runs.append({"stacked_rate": n * steps / wall, "seq_rate": len(sequential) * steps / seq_wall,
                         "cpu_ratio": (n * steps / cpu) / (len(sequential) * steps / seq_cpu), "info": info,
                         "wall": wall, "cpu": cpu, "seq_cpu": seq_cpu})
        ratios = [r["stacked_rate"] / r["seq_rate"] for r in runs]
        mid = runs[int(np.argsort(ratios)[len(ratios) // 2])]  # the run whose ratio is the median (odd repeats)
        stacked_rate, seq_rate, info, wall = mid["stacked_rate"], mid["seq_rate"], mid["info"], mid["wall"]
        entry.update({**_spread(f"speedup_n{n}", ratios), f"repeats_n{n}": repeats,
                      f"model_steps_per_s_stacked_n{n}": stacked_rate,
                      f"model_steps_per_s_sequential_n{n}": seq_rate,
                      f"sequential_models_n{n}": len(sequential),
                      f"models_per_pass_n{n}": info["models_per_pass"],
                      f"sample_fraction_n{n}": info["sample_seconds"] / wall,
                      f"sample_wait_fraction_n{n}": info["sample_wait_seconds"] / wall,
                      f"eval_fraction_n{n}": info["eval_seconds"] / wall})
        if on_cpu:
            entry[f"speedup_cpu_time_n{n}"] = float(statistics.median(r["cpu_ratio"] for r in runs))
            entry[f"stacked_cpu_ms_per_model_step_n{n}"] = 1e3 * mid["cpu"] / (n * steps)
            entry[f"sequential_cpu_ms_per_model_step_n{n}"] = 1e3 * mid["seq_cpu"] / (len(sequential) * steps)
        print(f"stacked {device.type} threads={threads} N={n}: x{entry[f'speedup_n{n}']:.2f} median of {repeats} "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] ({stacked_rate:.1f} vs {seq_rate:.1f} model-steps/s)", flush=True)
    return entry


# --------------------------------------------------------------------------------------------- LLM hooks
#: SmolLM2-135M-Instruct's shape (its config.json): a random Llama of this shape costs what SmolLM2 costs per token,
#: for timings on a host without the weights package.
SMOLLM2_SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "vocab_size": 49152}


def _tiny_llama(directory: Path, shape: dict | None = None) -> Path:
    """A 4-layer hidden-64 random Llama with a small byte-level BPE tokenizer (as the LLM integration tests); with
    ``shape`` (e.g. :data:`SMOLLM2_SHAPE`) a random Llama of that shape and the same small tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    corpus = ["You are a poet who answers in verse.", "How can I sleep better?", "Keep a regular bedtime.",
              "What should I cook tonight?", "The capital of France is Paris.", "Two plus two is four."] * 4
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
                          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|im_start|>assistant\n' }}{% endif %}")
    torch.manual_seed(0)
    dims = shape or {"vocab_size": len(fast), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 2}
    model = LlamaForCausalLM(LlamaConfig(
        **dims, max_position_embeddings=256, pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id, bos_token_id=None, tie_word_embeddings=True))
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def bench_llm(device: torch.device, threads: int, which: str = "auto", reps: int = 7) -> dict:
    """llm.model.forward with every layer's residual hooked over the same forward without hooks: ``reps``
    interleaved pairs after one warm-up pair; the ratio of each pair, median with min and max."""
    limit_threads(threads)
    use_smollm2 = which == "smollm2" or (which == "auto" and _packaged())
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        if use_smollm2:
            llm = L.load_llm(device=str(device), threads=threads)
            label = f"{llm.name} (SmolLM2, the studies' model)"
        else:
            llm = L.load_llm(model=_tiny_llama(Path(tmp) / "tiny-llama"), device=str(device), threads=threads,
                             root=Path(tmp) / "cache")
            label = "tiny random Llama (4 layers, hidden 64; SmolLM2 weights package not used)"
        load_seconds = time.perf_counter() - start
        prompts = [("You are a poet who answers in verse.", "How can I sleep better?"),
                   ("You are a surgeon.", "What should I cook tonight?"),
                   ("", "Name a colour."), ("You are a pirate.", "Tell me about the sea.")] * 2
        seqs = [L.scored_sequence(L.chat_prompt_ids(llm, system, user), L.encode(llm, "Keep a regular bedtime."))
                for system, user in prompts]
        layers = list(range(1, llm.n_layers + 1))
        times: dict[str, list[float]] = {"bare": [], "hooked": []}
        for rep in range(reps + 1):  # interleaved; the first pair warms up and is dropped
            for name, hooked in (("bare", ()), ("hooked", layers)):
                _sync(device)
                t0 = time.perf_counter()
                L.forward(llm, seqs, layers=hooked)
                _sync(device)
                if rep:
                    times[name].append(time.perf_counter() - t0)
        bare, hooked = statistics.median(times["bare"]), statistics.median(times["hooked"])
        ratios = [h / b for h, b in zip(times["hooked"], times["bare"])]  # each pair ran back to back
        return {**_spread("forward_overhead", ratios), "bare_forward_s": bare, "hooked_forward_s": hooked,
                "model": label, "load_seconds": load_seconds, "n_layers_hooked": len(layers),
                "batch": len(seqs), "tokens_per_sequence_max": max(len(s.ids) for s in seqs), "reps": reps}


# --------------------------------------------------------------------------------------------- stacked LoRA
def _lora_jobs(llm: L.LLM, k: int, steps: int, length: int = 64, n_seqs: int = 32) -> list:
    """K adapters' jobs: each its own seed and its own random token sequences (response = the second half)."""
    spec = LoraSpec(rank=32, alpha=64.0, first_layer=0, lr=1e-4, steps=steps, batch_size=16)
    vocab = int(llm.model.get_input_embeddings().weight.shape[0])
    jobs = []
    for seed in range(k):
        g = torch.Generator().manual_seed(1000 + seed)
        ids = torch.randint(2, vocab, (n_seqs, length), generator=g).tolist()
        jobs.append(StackedJob([L.Scored(tuple(row), length // 2) for row in ids], replace(spec, seed=seed)))
    return jobs


def bench_lora_stacked(device: torch.device, threads: int, ks: list[int], steps: int, repeats: int,
                       which: str = "auto") -> dict:
    """Stacked LoRA (K adapters a step) against one adapter alone: adapter-steps/s, median of ``repeats``, of
    whole calls (``speedup_k<K>``) and of the training loops alone (``loop_speedup_k<K>``)."""
    limit_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if which == "smollm2" or (which == "auto" and _packaged()):
            llm, label = L.load_llm(device=str(device), threads=threads, root=Path(tmp) / "cache"), "SmolLM2"
        elif which == "smollm2-shape":
            llm = L.load_llm(model=_tiny_llama(Path(tmp) / "shaped", SMOLLM2_SHAPE), device=str(device),
                             threads=threads, root=Path(tmp) / "cache")
            label = "random Llama of SmolLM2-135M's shape (30 blocks, hidden 576; no weights package needed)"
        else:
            llm = L.load_llm(model=_tiny_llama(Path(tmp) / "tiny-llama"), device=str(device), threads=threads,
                             root=Path(tmp) / "cache")
            label = "tiny random Llama (4 layers, hidden 64)"
        entry: dict = {"model": label, "steps": steps, "repeats": repeats, "rank": 32, "batch_size": 16,
                       "tokens_per_sequence": 64, "threads": threads}
        warm = _lora_jobs(llm, 1, 1)[0]
        finetune(llm, warm.seqs, warm.spec, cache=False)  # imports and first-call costs, untimed
        for k in ks:
            # two readings: whole calls (setup, bottom residual, saving / merging included) and the training
            # loops alone (train_stacked's group_seconds, finetune's train_s), which a longer run approaches
            rates: dict[str, list[float]] = {n: [] for n in ("stacked", "alone", "loop_stacked", "loop_alone")}
            for rep in range(repeats):
                jobs = _lora_jobs(llm, k, steps)
                llm_rep = replace(llm, cache_dir=Path(tmp) / f"k{k}_r{rep}")  # an empty adapter cache each run
                keys, stacked_s, _ = _timed(lambda r=llm_rep, j=jobs: train_stacked(r, j, progress=False), device)
                tuned, alone_s, _ = _timed(lambda j=jobs: finetune(llm, j[0].seqs, j[0].spec, cache=False), device)
                meta = json.loads((adapter_dir(llm_rep, keys[0]) / "meta.json").read_text())
                rates["stacked"].append(k * steps / stacked_s)
                rates["alone"].append(steps / alone_s)
                rates["loop_stacked"].append(k * steps / meta["stacked"]["group_seconds"])
                rates["loop_alone"].append(steps / tuned.train_s)
            for prefix, fast, slow in (("", "stacked", "alone"), ("loop_", "loop_stacked", "loop_alone")):
                ratios = [a / b for a, b in zip(rates[fast], rates[slow])]
                entry.update({**_spread(f"{prefix}speedup_k{k}", ratios),
                              f"{prefix}adapter_steps_per_s_stacked_k{k}": statistics.median(rates[fast]),
                              f"{prefix}adapter_steps_per_s_alone_k{k}": statistics.median(rates[slow])})
                print(f"stacked LoRA {device.type} K={k}, {'training loops' if prefix else 'whole calls'}: "
                      f"x{entry[f'{prefix}speedup_k{k}']:.2f} [{min(ratios):.2f}, {max(ratios):.2f}] "
                      f"adapter-steps/s over one adapter alone ({label})", flush=True)
    return entry


def bench_sweep(device: torch.device, params_name: str = "full", repeats: int = 3) -> dict:
    """Study 04's grid sweep ``repeats`` times, each from an empty model cache: median wall and training seconds
    with their min and max, and every run."""
    params = load_params(sweep_driver.STUDY, params_name)
    runs = []
    for _ in tqdm(range(repeats), desc=f"sweep {params_name} on {device.type}", leave=False):
        with tempfile.TemporaryDirectory() as tmp:
            runs.append(sweep_driver.run_sweep(params, params_name, Path(tmp) / "grid.json", device=str(device),
                                               cache_dir=str(Path(tmp) / "models")))
    walls, trains = [r["wall_s"] for r in runs], [r["train_s"] for r in runs]
    entry = {**_spread("wall_s", walls), **_spread("train_s", trains), "wall_s_runs": walls, "train_s_runs": trains,
             "repeats": repeats, "params": params_name, "device": runs[0]["device"], "trainer": runs[0]["trainer"],
             "workers": runs[0]["workers"], "n_jobs": runs[0]["n_jobs"]}
    print(f"sweep {params_name} on {entry['device']}: {entry['wall_s']:.1f} s wall [{min(walls):.1f}, "
          f"{max(walls):.1f}], median of {repeats} cold runs", flush=True)
    return entry


def _packaged() -> bool:
    try:
        return L.weights_path().exists()
    except L.LLMError:  # the weights package is not installed (e.g. on a GPU host without it)
        return False


# --------------------------------------------------------------------------------------------- study 02
def bench_study02(device: torch.device, threads: int, params: str = "default", cache_dir: Path | None = None) -> dict:
    """Study 02's training (or cache loading) and steering evaluations, timed."""
    limit_threads(threads)
    p = yaml.safe_load((REPO_ROOT / "params" / STUDY / f"{params}.yaml").read_text())
    timings: dict = {}
    start = time.perf_counter()
    models = {}
    for process in p["processes"]:
        for seed in p["seeds"]:
            steps = p["train_steps"][process]
            config = TrainConfig(process=process, steps=steps, batch_size=p["batch_size"][process],
                                 lr=float(p["learning_rate"][process]), seed=seed, eval_every=max(steps // 10, 1),
                                 eval_sequences=p["eval_sequences"],
                                 snapshot_steps=tuple(round(f * steps) for f in p["snapshot_fractions"]))
            models[(process, seed)] = load_or_train(config, device=str(device), cache_dir=cache_dir, progress=False)
    _sync(device)
    timings["train_or_load_s"] = time.perf_counter() - start
    timings["trained_from_scratch"] = sum(not m.from_cache for m in models.values())

    def timed(name: str, fn) -> None:
        _, timings[name], _ = _timed(fn, device)

    n, seed = p["n_steering_sequences"], p["analysis_seed"]
    timed("steering_final_layer_s", lambda: steering_frame(models, p["scales"], n, seed, progress=False))
    hooks = residual_hooks(next(iter(models.values())).model)
    timed("steering_by_layer_s", lambda: steering_frame(models, [p["layer_scale"]], n, seed, hooks=hooks,
                                                        progress=False))
    semi = {k: v for k, v in models.items() if k[0] == "semi_factored"}
    if semi:
        timed("partition_s", lambda: partition_frame(semi, ["(1,0)", "(0,1)"], p["partition_scales"], n, seed))
    timings["params"] = params
    return timings


# --------------------------------------------------------------------------------------------- main
# --------------------------------------------------------------------------------------------- cold study runs
COLD_STUDIES = ("01_sfp_definition", "02_steering_specificity", "03_em_reversal", "04_persona_engineering")
COLD_ARMS = ("stacked", "sequential")
COLD_ROOT = REPO_ROOT / ".cache" / "bench" / "cold"


def total_key(studies: list[str]) -> str:
    """The key of a cold run's total: ``total`` over all of :data:`COLD_STUDIES`, else named by the studies'
    numbers (``total_01_02``), so that runs over different studies merge into one file without overwriting."""
    if sorted(studies) == sorted(COLD_STUDIES):
        return "total"
    return "total_" + "_".join(study.split("_")[0] for study in studies)


def cold_keys(device: torch.device, arm: str, threads: int | None = None, jobs: int = 1) -> str:
    """``cold_minutes`` (stacked) / ``cold_minutes_sequential`` / ``cold_speedup`` on a CPU at the studies' own
    thread counts; ``_cuda`` appended on a GPU, ``_t<threads>`` when the thread count was set for the run,
    ``_jobs<N>`` when the studies ran N at a time."""
    key = {"stacked": "cold_minutes", "speedup": "cold_speedup"}.get(arm, f"cold_minutes_{arm}")
    key = key if device.type == "cpu" else f"{key}_{device.type}"
    key = f"{key}_t{threads}" if threads else key
    return f"{key}_jobs{jobs}" if jobs > 1 else key


def bench_cold(device: torch.device, studies: list[str], arms: list[str], params: str = "default",
               root: Path = COLD_ROOT, threads: int | None = None, jobs: int = 1, repeats: int = 1) -> dict:
    """:func:`cold_once` ``repeats`` times, each from empty caches: minutes are medians over the repeats; the
    speed-ups (per study and total) are medians of the per-repeat ratios, with ``<key>_min`` / ``<key>_max``
    beside them and ``<key>_repeats``."""
    runs = [cold_once(device, studies, arms, params, root, threads, jobs) for _ in range(repeats)]
    out = {key: {k: statistics.median(r[key][k] for r in runs) for k in runs[0][key]} for key in runs[0]}
    speedup = cold_keys(device, "speedup", threads, jobs)
    if speedup in out:
        for bound, fn in (("min", min), ("max", max)):
            out[f"{speedup}_{bound}"] = {k: fn(r[speedup][k] for r in runs) for k in runs[0][speedup]}
        out[f"{speedup}_repeats"] = {"repeats": repeats}
    return out


def cold_once(device: torch.device, studies: list[str], arms: list[str], params: str = "default",
              root: Path = COLD_ROOT, threads: int | None = None, jobs: int = 1) -> dict:
    """Cold ``make reports`` of each study once per trainer, side by side, each arm with its own empty model cache.

    Study by study, the arms one after the other (so a change of machine load hits both), each a fresh
    ``python -m persona_wm.io.runner`` process with ``--set trainer=ARM`` (studies without that parameter
    train nothing and simply run twice) and ``PERSONA_WM_MODEL_CACHE`` set to the arm's cache under ``root``,
    which starts empty; later studies of an arm reuse its earlier studies' models, as in one cold
    ``make reports``. Outputs go to ``root/<arm>/outputs`` (kept for inspection, never ``outputs/``).
    ``threads``: the runner's ``--threads`` (both arms; default: each study's ``torch_threads``), and the keys
    get ``_t<threads>`` appended.
    Returns ``{cold_keys(device, arm): {study: minutes, ..., total_key(studies): minutes}}`` and the speed-ups
    (sequential / stacked minutes) per study and in total under ``cold_speedup[_cuda]``.

    ``jobs`` > 1: each arm is one runner process over all ``studies`` with ``--jobs jobs`` (up to that many
    notebooks at once, as ``make reports JOBS=``); only its wall time is measured, as the total.
    """
    shutil.rmtree(root, ignore_errors=True)
    out: dict[str, dict[str, float]] = {cold_keys(device, arm, threads, jobs): {} for arm in arms}
    if jobs > 1:
        with_trainer = any("trainer" in parameter_schema(st) for st in studies)
        for arm in tqdm(arms, desc=f"cold runs, {jobs} studies at a time", unit="arm"):
            minutes = _runner_minutes(studies, arm, device, params, root, threads, jobs, with_trainer)
            out[cold_keys(device, arm, threads, jobs)][total_key(studies)] = minutes
            print(f"cold {', '.join(studies)} at {jobs} a time, trainer={arm}: {minutes:.2f} min (load {_load()})",
                  flush=True)
    else:
        for study in tqdm(studies, desc="cold runs", unit="study"):
            has_trainer = "trainer" in parameter_schema(study)
            for arm in arms:
                minutes = _runner_minutes([study], arm, device, params, root, threads, jobs, has_trainer)
                out[cold_keys(device, arm, threads)][study] = minutes
                print(f"cold {study} trainer={arm}: {minutes:.2f} min (load {_load()})", flush=True)
        for values in out.values():
            values[total_key(studies)] = sum(values.values())
    if set(COLD_ARMS) <= set(arms):
        fast, slow = (out[cold_keys(device, arm, threads, jobs)] for arm in ("stacked", "sequential"))
        out[cold_keys(device, "speedup", threads, jobs)] = {k: slow[k] / fast[k] for k in fast}
    return out


def _runner_minutes(studies: list[str], arm: str, device: torch.device, params: str, root: Path,
                    threads: int | None, jobs: int, set_trainer: bool) -> float:
    """Wall minutes of one ``python -m persona_wm.io.runner`` process over ``studies`` for trainer ``arm``
    (outputs and model cache under ``root/<arm>``; ``--set trainer=`` only when a study declares it)."""
    command = [sys.executable, "-m", "persona_wm.io.runner", "--study", *studies, "--params", params,
               "--output-root", str(root / arm / "outputs"), "--device", device.type]
    command += ["--jobs", str(jobs)] if jobs > 1 else []
    command += ["--set", f"trainer={arm}"] if set_trainer else []
    command += ["--threads", str(threads)] if threads else []
    began = time.perf_counter()
    subprocess.run(command, env={**os.environ, MODEL_CACHE_ENV: str(root / arm / "models")}, check=True)
    return (time.perf_counter() - began) / 60


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS))
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when present)")
    parser.add_argument("--ns", type=_ints, default=[1, 8, 64], help="stacked model counts, e.g. 1,8,64,256")
    parser.add_argument("--threads", type=_ints, default=None,
                        help="torch/BLAS thread counts to measure the stacked section at (default 1,2 on a CPU, "
                             "1 on a GPU); the other sections use the first")
    parser.add_argument("--steps", type=int, default=None, help="training steps per measured run "
                                                                 "(default 50 on a CPU, 300 on a GPU)")
    parser.add_argument("--seq-models", type=int, default=4, help="models trained one at a time per measurement")
    parser.add_argument("--models-per-pass", type=int, default=None, help="stacked models per forward pass "
                                                                           "(default: all on a GPU, 1 on a CPU)")
    parser.add_argument("--llm", choices=("auto", "smollm2", "tiny", "smollm2-shape"), default="auto",
                        help="model of the llm and lora_stacked sections (smollm2-shape: lora_stacked only)")
    parser.add_argument("--params", default="default", help="study 02 params file (study02 section)")
    parser.add_argument("--sweep-params", default="full", help="sweep section: study 04 params file")
    parser.add_argument("--studies", default=",".join(COLD_STUDIES),
                        help="cold section: comma-separated studies (default: %(default)s)")
    parser.add_argument("--arms", default=",".join(COLD_ARMS),
                        help="cold section: trainers to run each study with (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cold section: studies at a time (runner --jobs); > 1 measures the wall time of all of "
                             "them together, key suffix _jobs<N>")
    parser.add_argument("--lora-ks", type=_ints, default=[8], help="lora_stacked section: adapters per stacked run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="hmm, sampler, stacked, lora_stacked, sweep and cold sections: runs per ratio "
                             "(median, with min and max)")
    parser.add_argument("--matmul-precision", choices=("highest", "high"), default="highest",
                        help="lora_stacked only: torch.set_float32_matmul_precision for both arms (high: TF32 "
                             "matmuls on a GPU, keys lora_stacked.<device>_tf32; the studies use highest)")
    parser.add_argument("--update", action="store_true",
                        help="write the committed outputs/bench/metrics.json (default: .cache/bench/metrics.json)")
    parser.add_argument("--output", type=Path, default=None, help="write FILE instead")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = OUTPUT if args.update else SCRATCH
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.matmul_precision != "highest" and set(args.sections) != {"lora_stacked"}:
        parser.error("--matmul-precision high is for --sections lora_stacked alone (the other sections' keys do not "
                     "record it)")
    studies, arms = _names(args.studies), _names(args.arms)
    if bad := [a for a in arms if a not in COLD_ARMS]:
        parser.error(f"--arms: unknown trainer(s) {bad}; choose from {', '.join(COLD_ARMS)}")
    if bad := [st for st in studies if not notebook_path(st).exists()]:
        parser.error(f"--studies: no notebook for {bad}")
    wanted = args.device.strip().lower()
    if wanted not in ("cpu", "cuda", "auto"):
        parser.error(f"--device must be cpu, cuda or auto, got {args.device!r}")
    if wanted == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    device = torch.device("cuda" if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()) else "cpu")
    threads = args.threads or ([1, 2] if device.type == "cpu" else [1])
    steps = args.steps or DEFAULT_STEPS[device.type]
    metrics = read_metrics(args.output)
    warnings.filterwarnings("ignore", category=DeprecationWarning)

    def save(section: str, key: str, value: dict, used_threads) -> None:
        # re-read so that a section's result is kept even if a later section fails
        current = read_metrics(args.output)
        where = machine(device, used_threads)
        if section == "stacked":  # runs at other N merge into the entry; meta keeps one line per run
            current.setdefault("stacked_training", {}).setdefault(key, {}).update(value)
            runs = current.setdefault("meta", {}).setdefault(f"stacked_training.{key}", [])
            runs.append({**where, "ns": args.ns, "steps": value["steps"]})
        else:
            current.setdefault("meta", {})[section] = where
            current[key] = value
        write_metrics(current, args.output)
        metrics.clear()
        metrics.update(current)

    if "hmm" in args.sections:
        limit_threads(threads[0])
        result = bench_hmm(repeats=args.repeats)
        print(f"GHMM vs hmmlearn: x{result['speedup']:.1f} [{result['speedup_min']:.1f}, {result['speedup_max']:.1f}] "
              f"(per-sequence score), x{result['speedup_vs_lengths']:.1f} (one call with lengths), median of "
              f"{args.repeats}", flush=True)
        save("hmm", "ghmm_vs_hmmlearn", result, threads[0])
    if "sampler" in args.sections:
        limit_threads(threads[0])
        result = bench_sampler(repeats=args.repeats)
        print(f"sparse vs dense sampler ({result['process']}): x{result['speedup']:.2f} [{result['speedup_min']:.2f}, "
              f"{result['speedup_max']:.2f}], median of {args.repeats}", flush=True)
        save("sampler", "sparse_sampler", result, threads[0])
    if "stacked" in args.sections:
        for count in threads:
            label = f"{device.type}_t{count}"
            save("stacked", label, bench_stacked(device, args.ns, count, steps, args.seq_models,
                                                 args.models_per_pass, args.repeats), count)
    if "llm" in args.sections:
        result = bench_llm(device, threads[0], args.llm)
        print(f"LLM forward with every layer hooked / without: x{result['forward_overhead']:.3f} "
              f"[{result['forward_overhead_min']:.3f}, {result['forward_overhead_max']:.3f}] ({result['model']})",
              flush=True)
        save("llm", "llm", result, threads[0])
    if "study02" in args.sections:
        save("study02", "study02", bench_study02(device, threads[0], args.params), threads[0])
    if "lora_stacked" in args.sections:
        torch.set_float32_matmul_precision(args.matmul_precision)
        result = bench_lora_stacked(device, threads[0], args.lora_ks, args.steps or (3 if device.type == "cpu" else 20),
                                    args.repeats, args.llm)
        current = read_metrics(args.output)
        label = device.type + ("" if args.matmul_precision == "highest" else "_tf32")
        result["matmul_precision"] = args.matmul_precision
        current.setdefault("lora_stacked", {})[label] = result
        current.setdefault("meta", {})[f"lora_stacked.{label}"] = machine(device, threads[0])
        write_metrics(current, args.output)
        metrics.clear()
        metrics.update(current)
    if "sweep" in args.sections:
        key = f"sweep_{args.sweep_params}_grid_{device.type}"  # also the meta key: cpu and cuda lines apart
        save(key, key, bench_sweep(device, args.sweep_params, args.repeats), None)
    if "cold" in args.sections:
        result = bench_cold(device, studies, arms, args.params, threads=args.threads[0] if args.threads else None,
                            repeats=args.repeats,
                            jobs=args.jobs)
        current = read_metrics(args.output)
        for key, value in result.items():
            current.setdefault(key, {}).update(value)
        label = (f"cold.{device.type}" + (f"_t{args.threads[0]}" if args.threads else "")
                 + (f"_jobs{args.jobs}" if args.jobs > 1 else "")
                 + ("" if total_key(studies) == "total" else "." + total_key(studies).removeprefix("total_")))
        current.setdefault("meta", {})[label] = {**machine(device, args.threads[0] if args.threads else None),
                                                 "studies": studies, "arms": arms, "params": args.params,
                                                 "jobs": args.jobs, "repeats": args.repeats}
        write_metrics(current, args.output)
        metrics.clear()
        metrics.update(current)
    print(f"wrote {args.output}")
    return metrics


if __name__ == "__main__":
    main()
