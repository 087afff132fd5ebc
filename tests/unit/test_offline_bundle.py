"""scripts/offline_bundle.sh: parts under a size limit, each checked by sha256, installed once per bundle."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "offline_bundle.sh"


def _wheel(folder: Path) -> None:
    """A minimal pure-python wheel (importable package ``tinybundle``)."""
    with zipfile.ZipFile(folder / "tinybundle-1.0-py3-none-any.whl", "w") as z:
        z.writestr("tinybundle/__init__.py", "VALUE = 42\n")
        z.writestr("tinybundle-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: tinybundle\nVersion: 1.0\n")
        z.writestr("tinybundle-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n")
        z.writestr("tinybundle-1.0.dist-info/RECORD", "")
    (folder / "padding.whl.txt").write_bytes(os.urandom(3 * 1024 * 1024))  # forces several 1-MiB parts


def _sh(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", **(env or {})}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full, capture_output=True, text=True,
                          check=check)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    _wheel(src)
    _sh("pack-dir", str(src), str(tmp_path / ".bundle" / "toy"), "1", cwd=tmp_path)
    return tmp_path


def test_parts_respect_the_limit_and_carry_the_manifest(bundle: Path) -> None:
    parts = sorted((bundle / ".bundle" / "toy").glob("*/part-*"))
    assert len(parts) >= 4 and all(p.stat().st_size <= 1024 * 1024 for p in parts)
    assert all((p.parent / "SHA256SUMS").is_file() for p in parts)


def test_a_corrupt_or_missing_part_is_named(bundle: Path) -> None:
    dirs = sorted(str(d) for d in (bundle / ".bundle" / "toy").iterdir())
    ok = _sh("join", str(bundle / "joined.tar"), *dirs, cwd=bundle)
    assert len(ok.stdout.strip()) == 64
    victim = next((bundle / ".bundle" / "toy" / "01").glob("part-*"))
    data = bytearray(victim.read_bytes())
    data[10] ^= 1
    victim.write_bytes(bytes(data))
    bad = _sh("join", str(bundle / "joined.tar"), *dirs, cwd=bundle, check=False)
    assert bad.returncode != 0 and "part-01 is corrupt" in bad.stderr
    victim.unlink()
    gone = _sh("join", str(bundle / "joined.tar"), *dirs, cwd=bundle, check=False)
    assert gone.returncode != 0 and "part-01 is missing" in gone.stderr


def test_run_installs_once_and_reuses_the_install(bundle: Path) -> None:
    env = {"SITE": str(bundle / "site"), "BUNDLE_STAGE": str(bundle / "stage")}
    # parts uploaded one at a time: stage two of them, the rest stay under .bundle/toy/
    for n in ("00", "01"):
        _sh("stage", f".bundle/toy/{n}", cwd=bundle, env=env)
        for p in (bundle / ".bundle" / "toy" / n).glob("part-*"):
            p.unlink()
    cmd = ("python3", "-c", "import tinybundle; print('value', tinybundle.VALUE)")
    first = _sh("run", "toy", *cmd, cwd=bundle, env=env)
    assert "value 42" in first.stdout and "reusing" not in first.stdout
    second = _sh("run", "toy", *cmd, cwd=bundle, env=env)
    assert "value 42" in second.stdout and "reusing it" in second.stdout
