"""Device choice for toy models: runner --device / make reports DEVICE= -> $PERSONA_WM_DEVICE -> default_device()."""

from __future__ import annotations

import pytest
import torch

from persona_wm.io import runner
from persona_wm.toy.train import default_device


@pytest.mark.parametrize("value, expected", [("cpu", "cpu"), ("auto", "cuda" if torch.cuda.is_available() else "cpu"),
                                             ("", "cuda" if torch.cuda.is_available() else "cpu")])
def test_default_device_follows_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv(runner.DEVICE_ENV, value)
    assert default_device() == expected


def test_bad_or_unavailable_device_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(runner.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="PERSONA_WM_DEVICE must be cpu, cuda or auto, got 'tpu'"):
        default_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv(runner.DEVICE_ENV, "cuda")
        with pytest.raises(RuntimeError, match="no CUDA device"):
            default_device()


def test_runner_device_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.parse_args(["--device", "cuda"]).device == "cuda"
    with pytest.raises(SystemExit):
        runner.parse_args(["--device", "gpu"])
    assert "invalid choice" in capsys.readouterr().err
