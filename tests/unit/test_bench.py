"""persona_wm.bench: the hmmlearn reference is the same process, and the file is merged, not overwritten."""

from __future__ import annotations

import json

import numpy as np
import pytest

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
    result = bench.bench_hmm(n_sequences=200, length=5)
    assert result["max_abs_loglik_diff"] < 1e-10 and result["speedup"] > 0 and result["n_sequences"] == 200


def test_cold_minutes_merge_into_the_file(tmp_path) -> None:
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"ghmm_vs_hmmlearn": {"speedup": 80.0}}))
    bench.main(["--cold", "02_steering_specificity=3.5", "--cold", "03_em_reversal=12", "--output", str(path)])
    metrics = json.loads(path.read_text())
    assert metrics["cold_minutes"] == {"02_steering_specificity": 3.5, "03_em_reversal": 12.0}
    assert metrics["ghmm_vs_hmmlearn"] == {"speedup": 80.0}  # other sections kept
    with pytest.raises(ValueError, match="positive"):
        bench.record_cold_minutes({"01_sfp_definition": -1.0}, path)
    with pytest.raises(SystemExit):
        bench.main(["--cold", "01_sfp_definition=soon", "--output", str(path)])


@pytest.mark.parametrize("text", ["0", "1,x", "", "-2"])
def test_counts_must_be_positive_integers(text) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--ns", text, "--sections", "hmm", "--output", "/nonexistent/never-written.json"])
