"""scripts/gpu_measurements.sh: tasks in the order given, each marked done once it succeeds and skipped by the next
invocation; a task that outlives the deadline is interrupted and not marked, so the next invocation resumes it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(repo: Path, *tasks: str, deadline: int, sleep: float = 0.0, margin: int = 25) -> subprocess.CompletedProcess:
    fake = repo / "bin"
    fake.mkdir(exist_ok=True)
    # a stand-in python3: records its arguments, optionally outlives the deadline, succeeds
    (fake / "python3").write_text(f'#!/usr/bin/env bash\necho "$@ log=${{PERSONA_WM_KERNEL_LOG:-}}" >> {repo}/calls.txt\ncase "$*" in *persona_wm*) sleep {sleep};; esac\n'
                                  'all="$*"; case "$all" in *--output\\ *) out=${all##*--output }; '
                                  'echo {} > "${out%% *}";; esac\n')
    (fake / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "DEADLINE_S": str(deadline), "RESULTS": "res",
           "MARGIN_S": str(margin)}
    return subprocess.run(["bash", "scripts/gpu_measurements.sh", *tasks], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)


def _task_calls(repo: Path) -> list[str]:
    return [c for c in (repo / "calls.txt").read_text().splitlines() if "persona_wm" in c]


def _repo(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gpu_measurements.sh", tmp_path / "scripts")
    return tmp_path


def test_done_tasks_are_skipped_and_the_order_is_the_callers(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    first = _run(repo, "bench_stacked", "bench_lora", deadline=300)
    assert first.returncode == 0, first.stderr
    calls = _task_calls(repo)
    assert "--sections stacked" in calls[-2] and "--sections lora_stacked" in calls[-1]
    assert sorted(p.name for p in (repo / ".cache/gpu_measurements/done").iterdir()) == ["bench_lora", "bench_stacked"]
    assert (repo / "res" / "bench_lora.json").is_file()
    _run(repo, "bench_lora", deadline=300)
    assert _task_calls(repo) == calls  # not run again
    assert "rc=0" in (repo / "res" / "history.log").read_text()


def test_a_task_past_the_deadline_is_interrupted_and_resumed_later(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    stopped = _run(repo, "05b", deadline=62, sleep=200, margin=60)  # 05b needs 60 s to start; stopped after 2 s
    assert stopped.returncode == 0
    assert not (repo / ".cache/gpu_measurements/done/05b").exists()
    assert _task_calls(repo)[-1].endswith("log=res/05b_kernel.log")  # the kernel's progress bars are kept
    assert "rc=0" not in (repo / "res" / "history.log").read_text()
    deferred = _run(repo, "05a", deadline=30)  # too little time: deferred, nothing runs
    assert "defer 05a" in deferred.stdout
    assert _run(repo, "nope", deadline=30).returncode == 2
