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


def _wheel(folder: Path, name: str = "tinybundle", value: int = 42, padding_mib: int = 3) -> None:
    """A minimal pure-python wheel (importable package ``name`` with ``VALUE = value``)."""
    with zipfile.ZipFile(folder / f"{name}-1.0-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", f"VALUE = {value}\n")
        z.writestr(f"{name}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{name}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n")
        z.writestr(f"{name}-1.0.dist-info/RECORD", "")
    (folder / "padding.whl.txt").write_bytes(os.urandom(padding_mib * 1024 * 1024))  # forces several 1-MiB parts


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
    env = {"SITE_ROOT": str(bundle / "site"), "BUNDLE_STAGE": str(bundle / "stage")}
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


def test_two_bundles_staged_side_by_side_stay_apart(bundle: Path) -> None:
    """Parts of two bundles staged on one host go to their own folders, install into their own sites, and
    ``run toy,other`` puts both on the path (the bench needs the toy and the LLM bundles together)."""
    src = bundle / "src-other"
    src.mkdir()
    _wheel(src, name="tinyother", value=7, padding_mib=1)
    _sh("pack-dir", str(src), str(bundle / ".bundle" / "other"), "1", cwd=bundle)
    env = {"SITE_ROOT": str(bundle / "site"), "BUNDLE_STAGE": str(bundle / "stage")}
    for name in ("toy", "other"):
        for part in sorted((bundle / ".bundle" / name).iterdir()):
            _sh("stage", str(part.relative_to(bundle)), cwd=bundle, env=env)
            for p in part.glob("part-*"):
                p.unlink()
    assert sorted(d.name for d in (bundle / "stage").iterdir()) == ["other", "toy"]
    cmd = ("python3", "-c", "import tinybundle, tinyother; print('values', tinybundle.VALUE, tinyother.VALUE)")
    both = _sh("run", "toy,other", *cmd, cwd=bundle, env=env)
    assert "values 42 7" in both.stdout
    assert (bundle / "site" / "toy").is_dir() and (bundle / "site" / "other").is_dir()
    again = _sh("run", "other", "python3", "-c", "import tinyother", cwd=bundle, env=env)
    assert "reusing it" in again.stdout
    bad = _sh("run", "toy,../x", "true", cwd=bundle, env=env, check=False)
    assert bad.returncode != 0 and "bad bundle name" in bad.stderr
