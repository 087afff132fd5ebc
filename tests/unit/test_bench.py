"""persona_wm.bench: the hmmlearn reference is the same process, and the file is merged, not overwritten."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from persona_wm import bench
from persona_wm.core.ghmm import GHMM
from persona_wm.processes import get_process


def test_hmmlearn_reference_is_the_same_process() -> None:
    process = get_process("mess3")
    tokens = process.sample(50, 6, np.random.default_rng(1))
    hmm = bench.as_categorical_hmm(process)
    ours = np.log(process.forward(tokens)[1]).sum(axis=1)
    theirs = np.array([hmm.score(row.reshape(-1, 1)) for row in tokens])
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-10)


def test_hmmlearn_reference_refuses_a_process_that_emits_on_edges() -> None:
    # Pr(x | s -> t) depends on s as well as t: no state-emitting HMM has these words' probabilities
    transfer = np.array([[[0.4, 0.1], [0.1, 0.4]], [[0.1, 0.4], [0.4, 0.1]]])
    with pytest.raises(ValueError, match="not P\\[s, t\\] E\\[t, x\\]"):
        bench.as_categorical_hmm(GHMM(transfer, np.array([0.5, 0.5]), name="edge"))


def test_bench_hmm_reports_agreement_and_speedup() -> None:
    result = bench.bench_hmm(n_sequences=200, length=5, repeats=3)
    assert result["max_abs_loglik_diff"] < 1e-10 and result["speedup"] > 0 and result["n_sequences"] == 200
    assert result["repeats"] == 3 and result["speedup_min"] <= result["speedup"] <= result["speedup_max"]


def test_sampler_section_times_both_paths_on_the_same_tokens() -> None:
    result = bench.bench_sampler(n_sequences=3_000, length=4, repeats=3)
    assert result["same_tokens"] and result["process"] == "em_seq()" and result["repeats"] == 3
    assert result["speedup_min"] <= result["speedup"] <= result["speedup_max"]
    assert result["dense_seconds"] > 0 and result["sparse_seconds"] > 0
    with pytest.raises(ValueError, match="sparse=True"):  # a small process has no sparse path to compare
        bench.bench_sampler("mess3", n_sequences=10, length=3, repeats=1)


def test_llm_section_reports_the_pairs_median_ratio_with_its_range() -> None:
    result = bench.bench_llm(torch.device("cpu"), 1, "tiny", reps=3)
    assert result["reps"] == 3 and result["n_layers_hooked"] == 4
    assert 0 < result["forward_overhead_min"] <= result["forward_overhead"] <= result["forward_overhead_max"]


def test_cold_section_refuses_unknown_arms_and_studies() -> None:
    with pytest.raises(SystemExit):
        bench.main(["--sections", "cold", "--arms", "stacked,parallel", "--output", "/nonexistent/never.json"])
    with pytest.raises(SystemExit):
        bench.main(["--sections", "cold", "--studies", "99_nope", "--output", "/nonexistent/never.json"])


def test_cold_runs_time_each_arm_with_its_own_empty_cache(monkeypatch, tmp_path) -> None:
    """bench_cold runs the runner once per (study, arm), sets the trainer only where declared and gives each
    arm its own model cache (here the runner is replaced by a recorder)."""
    import torch

    calls = []
    monkeypatch.setattr(bench.subprocess, "run", lambda command, env, check: calls.append((command, env)))
    (tmp_path / "stale").mkdir()
    out = bench.bench_cold(torch.device("cpu"), ["01_sfp_definition", "03_em_reversal"], ["stacked", "sequential"],
                           root=tmp_path)
    assert not (tmp_path / "stale").exists()  # a cold run starts from an empty root
    assert [(c[c.index("--study") + 1], c[-1]) for c, _ in calls] == [
        ("01_sfp_definition", "cpu"), ("01_sfp_definition", "cpu"),
        ("03_em_reversal", "trainer=stacked"), ("03_em_reversal", "trainer=sequential")]
    assert [env[bench.MODEL_CACHE_ENV] for _, env in calls] == [str(tmp_path / a / "models") for a in
                                                          ("stacked", "sequential") * 2]
    assert set(out) == {"cold_minutes", "cold_minutes_sequential", "cold_speedup", "cold_speedup_min",
                        "cold_speedup_max", "cold_speedup_repeats"}
    # a subset of the four studies names its total by them: runs over other studies merge without overwriting it
    assert set(out["cold_minutes"]) == {"01_sfp_definition", "03_em_reversal", "total_01_03"}
    assert out["cold_minutes"]["total_01_03"] == pytest.approx(sum(v for k, v in out["cold_minutes"].items()
                                                                   if k != "total_01_03"))
    assert bench.total_key(list(reversed(bench.COLD_STUDIES))) == "total"
    assert bench.cold_keys(torch.device("cuda"), "sequential") == "cold_minutes_sequential_cuda"
    assert bench.cold_keys(torch.device("cpu"), "speedup", 2) == "cold_speedup_t2"
    calls.clear()
    out = bench.bench_cold(torch.device("cpu"), ["03_em_reversal"], ["stacked", "sequential"], root=tmp_path, threads=2)
    assert all(c[-2:] == ["--threads", "2"] for c, _ in calls)
    assert {"cold_minutes_t2", "cold_minutes_sequential_t2", "cold_speedup_t2"} <= set(out)
    calls.clear()  # studies at once: one runner per arm over every study
    out = bench.bench_cold(torch.device("cpu"), ["01_sfp_definition", "03_em_reversal"], ["stacked", "sequential"],
                           root=tmp_path, jobs=2)
    assert [c[c.index("--study") + 1:c.index("--params")] for c, _ in calls] == [
        ["01_sfp_definition", "03_em_reversal"]] * 2
    assert [c[c.index("--jobs") + 1] for c, _ in calls] == ["2", "2"]
    assert [c[-1] for c, _ in calls] == ["trainer=stacked", "trainer=sequential"]
    assert {"cold_minutes_jobs2", "cold_minutes_sequential_jobs2", "cold_speedup_jobs2"} <= set(out)
    assert set(out["cold_minutes_jobs2"]) == {"total_01_03"}
    calls.clear()  # repeated: every repeat from empty caches, the ratio a median with its range
    (tmp_path / "stale").mkdir(parents=True)
    minutes = iter([1.0, 2.0, 1.0, 4.0, 1.0, 3.0])  # stacked, sequential per repeat: ratios 2, 4, 3
    monkeypatch.setattr(bench, "_runner_minutes", lambda *a, **k: next(minutes))
    out = bench.bench_cold(torch.device("cpu"), ["03_em_reversal"], ["stacked", "sequential"], root=tmp_path,
                           repeats=3)
    assert out["cold_speedup"]["03_em_reversal"] == 3.0 and out["cold_speedup_min"]["total_03"] == 2.0
    assert out["cold_speedup_max"]["total_03"] == 4.0 and out["cold_speedup_repeats"] == {"repeats": 3}
    assert out["cold_minutes_sequential"]["total_03"] == 3.0 and not (tmp_path / "stale").exists()


@pytest.mark.parametrize("text", ["0", "1,x", "", "-2"])
def test_counts_must_be_positive_integers(text) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--ns", text, "--sections", "hmm", "--output", "/nonexistent/never-written.json"])


def test_bench_writes_scratch_by_default_and_the_committed_file_only_with_update(monkeypatch, tmp_path) -> None:
    committed, scratch = tmp_path / "outputs" / "metrics.json", tmp_path / "scratch" / "metrics.json"
    monkeypatch.setattr(bench, "OUTPUT", committed)
    monkeypatch.setattr(bench, "SCRATCH", scratch)
    monkeypatch.setattr(bench, "bench_hmm", lambda repeats: {"speedup": 2.0, "speedup_min": 1.0, "speedup_max": 3.0,
                                                             "speedup_vs_lengths": 1.5})
    bench.main(["--sections", "hmm", "--device", "cpu"])
    assert scratch.is_file() and not committed.exists()
    bench.main(["--sections", "hmm", "--device", "cpu", "--update"])
    assert committed.is_file()
    assert bench.DEFAULT_STEPS == {"cpu": 50, "cuda": 300}  # the settings the committed GPU ratios used
    with pytest.raises(SystemExit):
        bench.main(["--sections", "hmm", "--repeats", "0"])


def test_lora_stacked_reports_whole_call_and_training_loop_ratios() -> None:
    result = bench.bench_lora_stacked(torch.device("cpu"), 1, [2], steps=2, repeats=2, which="tiny")
    for prefix in ("", "loop_"):
        ratio = result[f"{prefix}speedup_k2"]
        assert result[f"{prefix}speedup_k2_min"] <= ratio <= result[f"{prefix}speedup_k2_max"]
        assert ratio == pytest.approx(result[f"{prefix}adapter_steps_per_s_stacked_k2"]
                                      / result[f"{prefix}adapter_steps_per_s_alone_k2"], rel=0.5)
    # a training loop is part of its call: its rate is the higher one
    assert result["loop_adapter_steps_per_s_stacked_k2"] > result["adapter_steps_per_s_stacked_k2"]
    assert result["loop_adapter_steps_per_s_alone_k2"] > result["adapter_steps_per_s_alone_k2"]


def test_matmul_precision_is_for_the_lora_section_alone_and_labels_its_key(tmp_path, monkeypatch) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--sections", "hmm", "--matmul-precision", "high", "--output", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists()
    seen = []
    monkeypatch.setattr(bench, "bench_lora_stacked",
                        lambda *a, **k: seen.append(torch.get_float32_matmul_precision()) or {"speedup_k8": 1.0})
    try:
        out = bench.main(["--sections", "lora_stacked", "--device", "cpu", "--matmul-precision", "high",
                          "--output", str(tmp_path / "m.json")])
    finally:
        torch.set_float32_matmul_precision("highest")
    assert seen == ["high"] and out["lora_stacked"]["cpu_tf32"]["matmul_precision"] == "high"
    assert "lora_stacked.cpu_tf32" in out["meta"] and "cpu" not in out["lora_stacked"]


def test_sweep_section_runs_each_repeat_from_its_own_empty_cache(tmp_path, monkeypatch) -> None:
    """``--sections sweep``: one run_sweep per repeat, each with a fresh, empty model cache; the median wall and
    training seconds with min, max and every run under ``sweep_<params>_grid_<device>``."""
    from persona_wm.studies import persona_engineering_sweep as driver

    caches, walls = [], iter([30.0, 10.0, 20.0])

    def fake_run(params, params_name, out, workers=None, scheduler=None, device=None, cache_dir=None):
        assert not any(Path(cache_dir).glob("*")) and cache_dir not in caches
        caches.append(cache_dir)
        wall = next(walls)
        return {"wall_s": wall, "train_s": wall / 2, "device": "cpu", "trainer": "stacked", "workers": 1, "n_jobs": 4}

    monkeypatch.setattr(driver, "run_sweep", fake_run)
    out = bench.main(["--sections", "sweep", "--device", "cpu", "--sweep-params", "smoke", "--repeats", "3",
                      "--output", str(tmp_path / "m.json")])
    entry = out["sweep_smoke_grid_cpu"]
    assert (entry["wall_s"], entry["wall_s_min"], entry["wall_s_max"]) == (20.0, 10.0, 30.0)
    assert entry["train_s"] == 10.0 and entry["wall_s_runs"] == [30.0, 10.0, 20.0] and len(caches) == 3
    assert "sweep_smoke_grid_cpu" in out["meta"] and "sweep" not in out["meta"]
