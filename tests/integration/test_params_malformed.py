"""Malformed params files for studies 01 and 02: each is refused up front, fast, by name, with outputs untouched.

Issue 16 found that of 66 malformed files only 26 were rejected before any work; four (a size of 0,
a step count of 0, a duplicated process list, an unknown key inside a dict) ran to exit 0 and
replaced the committed outputs. Every row of the table below runs ``persona_wm.io.runner.main`` against a
temp copy of the repo's notebooks, params and outputs of both studies and asserts: exit code 1,
under 2 seconds, the offending field (or the reason) in the one error line, and ``outputs/``
byte-identical before and after.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from persona_wm.io import runner
from persona_wm.io.params import REPO_ROOT, load_params

S1 = "01_sfp_definition"
S2 = "02_steering_specificity"
STUDIES = (S1, S2)
BAD = "bad"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the real notebooks, params and outputs of studies 01 and 02 (nothing else is needed)."""
    root = tmp_path_factory.mktemp("repo")
    for study in STUDIES:
        (root / "notebooks").mkdir(exist_ok=True)
        shutil.copy(REPO_ROOT / "notebooks" / f"{study}.py", root / "notebooks")
        shutil.copytree(REPO_ROOT / "params" / study, root / "params" / study)
        shutil.copytree(REPO_ROOT / "outputs" / study, root / "outputs" / study)
        # Warm the imports (jupytext, the process registry and torch behind it) once, so the timing
        # below measures the validation, not the first import of torch.
        load_params(study, "smoke", root)
    return root


def snapshot(directory: Path) -> dict[str, bytes | None]:
    """Every path under ``directory`` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def smoke(root: Path, study: str) -> str:
    return (root / "params" / study / "smoke.yaml").read_text()


def replace(key: str, value: str) -> Callable[[str], str]:
    """Set ``key: value`` (raw YAML) in the smoke file."""

    def edit(text: str) -> str:
        pattern = re.compile(rf"^{re.escape(key)}:.*$", re.M)
        assert pattern.search(text), key
        return pattern.sub(lambda _: f"{key}: {value}", text)

    return edit


def drop(key: str) -> Callable[[str], str]:
    return lambda text: re.sub(rf"^{re.escape(key)}:.*\n", "", text, flags=re.M)


def append(line: str) -> Callable[[str], str]:
    return lambda text: text + line + "\n"


STEPS = "{z1r_x_z1r: 120, mess3_x_mess3: 120, semi_factored: 120}"

# (id, study, edit of the smoke file -> the bad file's text, what the message must name)
TEXT_CASES = [
    ("size_zero", S1, replace("simplex_length", "0"), "field 'simplex_length'"),
    ("size_negative", S1, replace("n_mi_sequences", "-5"), "field 'n_mi_sequences'"),
    ("size_huge", S1, replace("n_simplex_sequences", "1000000000000"), "field 'n_simplex_sequences'"),
    ("context_huge", S1, replace("context_length", "100000"), "field 'context_length'"),
    ("probability_above_1", S1, replace("leak_epsilon", "1.5"), "field 'leak_epsilon'"),
    ("probability_in_list_above_1", S1, replace("correlations", "[0.0, 1.5]"), "field 'correlations[1]'"),
    ("nan", S1, replace("correlations", "[0.0, .nan]"), "field 'correlations[1]'"),
    ("inf", S1, replace("leak_epsilon", ".inf"), "field 'leak_epsilon'"),
    ("empty_list", S1, replace("correlations", "[]"), "field 'correlations'"),
    ("duplicated_list_item", S1, replace("correlations", "[0.0, 0.5, 0.5]"), "field 'correlations'"),
    ("negative_seed", S1, replace("seed", "-1"), "field 'seed'"),
    ("wrong_type", S1, replace("context_length", "ten"), "field 'context_length'"),
    ("float_for_int", S1, replace("simplex_length", "8.5"), "field 'simplex_length'"),
    ("missing_field", S1, drop("seed"), "missing field 'seed'"),
    ("unknown_field", S1, append("sede: 1"), "unknown field 'sede'"),
    ("output_dir_in_file", S1, append("output_dir: /tmp/elsewhere"), "field 'output_dir'"),
    ("malformed_yaml", S1, replace("correlations", "[0.0, 0.5"), "invalid YAML"),
    ("duplicate_yaml_key", S1, append("seed: 1"), "duplicate key 'seed'"),
    ("empty_file", S1, lambda text: "", "top level must be a mapping"),
    ("train_steps_zero", S2, replace("train_steps", "{z1r_x_z1r: 120, mess3_x_mess3: 120, semi_factored: 0}"),
     "field 'train_steps['semi_factored']'"),
    ("duplicated_processes", S2, replace("processes", "[z1r_x_z1r, z1r_x_z1r, mess3_x_mess3]"), "field 'processes'"),
    ("unknown_key_in_dict", S2, replace("train_steps", STEPS[:-1] + ", extra: 10}"), "field 'train_steps'"),
    ("missing_key_in_dict", S2, replace("batch_size", "{z1r_x_z1r: 128, mess3_x_mess3: 128}"), "field 'batch_size'"),
    ("unknown_process", S2, replace("processes", "[z1r_x_z1r, mess3_x_mess3, not_a_process]"),
     "field 'processes[2]'"),
    ("learning_rate_zero", S2, replace("learning_rate", "{z1r_x_z1r: 0.0, mess3_x_mess3: 0.001, semi_factored: 0.001}"),
     "field 'learning_rate['z1r_x_z1r']'"),
    ("learning_rate_nan", S2, replace("learning_rate", "{z1r_x_z1r: .nan, mess3_x_mess3: 0.001, semi_factored: 0.001}"),
     "field 'learning_rate['z1r_x_z1r']'"),
    ("batch_huge", S2, replace("batch_size", "{z1r_x_z1r: 128, mess3_x_mess3: 1000000000, semi_factored: 128}"),
     "field 'batch_size['mess3_x_mess3']'"),
    ("fraction_above_1", S2, replace("snapshot_fractions", "[0.0, 0.5, 1.5]"), "field 'snapshot_fractions[2]'"),
    ("duplicated_seeds", S2, replace("seeds", "[0, 0]"), "field 'seeds'"),
    ("no_seeds", S2, replace("seeds", "[]"), "field 'seeds'"),
    ("threads_zero", S2, replace("torch_threads", "0"), "field 'torch_threads'"),
    ("threads_above_cores", S2, replace("torch_threads", "100000"), "field 'torch_threads'"),
    ("scales_without_1", S2, replace("scales", "[0.0, 0.5, 2.0]"), "field 'scales'"),
    ("eval_sequences_huge", S2, replace("eval_sequences", "1000000000"), "field 'eval_sequences'"),
    ("layer_scale_zero", S2, replace("layer_scale", "0"), "field 'layer_scale'"),
    ("bool_for_int", S2, replace("analysis_seed", "true"), "field 'analysis_seed'"),
    ("scalar_for_dict", S2, replace("train_steps", "120"), "field 'train_steps'"),
]


def write_bad_file(root: Path, study: str, edit: Callable[[str], str]) -> str:
    (root / "params" / study / f"{BAD}.yaml").write_text(edit(smoke(root, study)))
    return BAD


def non_utf8(root: Path, study: str) -> str:
    (root / "params" / study / f"{BAD}.yaml").write_bytes(smoke(root, study).encode() + b"# caf\xe9\n")
    return BAD


def directory(root: Path, study: str) -> str:
    (root / "params" / study / "x.yaml").mkdir()
    return "x"


def too_large(root: Path, study: str) -> str:
    (root / "params" / study / f"{BAD}.yaml").write_text(smoke(root, study) + "#" * 2_000_000 + "\n")
    return BAD


def absolute_path(root: Path, study: str) -> str:
    outside = root / "elsewhere.yaml"
    outside.write_text(smoke(root, study))  # a valid file, but not inside params/<study>/
    return str(outside)


def parent_path(root: Path, study: str) -> str:
    (root / "params" / "x.yaml").write_text(smoke(root, study))
    return "../x"


def nested_path(root: Path, study: str) -> str:
    return f"{study}/smoke"


def link_outside(root: Path, study: str) -> str:
    outside = root / "linked.yaml"
    outside.write_text(smoke(root, study))
    (root / "params" / study / "link.yaml").symlink_to(outside)
    return "link"


# (id, study, setup(root, study) -> the --params argument, what the message must name)
SETUP_CASES = [
    ("non_utf8", S1, non_utf8, "not UTF-8"),
    ("directory_named_yaml", S1, directory, "x.yaml: is a directory"),
    ("file_too_large", S2, too_large, "bytes"),
    ("params_absolute_path", S1, absolute_path, "--params"),
    ("params_parent_dir", S1, parent_path, "--params '../x'"),
    ("params_with_separator", S2, nested_path, "--params"),
    ("params_link_outside", S2, link_outside, "--params 'link'"),
]

CASES = [pytest.param(study, lambda root, s, e=edit: write_bad_file(root, s, e), expected, id=name)
         for name, study, edit, expected in TEXT_CASES]
CASES += [pytest.param(study, setup, expected, id=name) for name, study, setup, expected in SETUP_CASES]


@pytest.fixture
def clean(repo: Path):
    """Remove what a case added under params/ and the repo root (outputs/ must not need cleaning)."""
    before = {p for p in repo.rglob("*") if not p.is_relative_to(repo / "outputs")}
    yield repo
    for path in sorted({p for p in repo.rglob("*") if not p.is_relative_to(repo / "outputs")} - before, reverse=True):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


@pytest.mark.parametrize(("study", "setup", "expected"), CASES)
def test_malformed_params_fail_fast_by_name_and_touch_nothing(
    clean: Path, capsys: pytest.CaptureFixture[str], study: str, setup: Callable[[Path, str], str], expected: str
) -> None:
    root = clean
    name = setup(root, study)
    before = snapshot(root / "outputs")
    start = time.perf_counter()
    code = runner.main(["--study", study, "--params", name], root=root)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 1, err
    assert elapsed < 2.0, f"{elapsed:.2f} s"
    assert expected in err, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(root / "outputs") == before


def test_table_covers_the_issue_kinds() -> None:
    assert len(CASES) >= 25
    ids = {case.id for case in CASES}
    for kind in ("size_zero", "train_steps_zero", "duplicated_processes", "unknown_key_in_dict", "nan", "inf",
                 "size_huge", "non_utf8", "directory_named_yaml", "malformed_yaml", "missing_field", "unknown_field",
                 "wrong_type", "probability_above_1", "params_absolute_path", "params_parent_dir"):
        assert kind in ids


@pytest.mark.parametrize("study", STUDIES)
def test_the_committed_params_still_validate_in_the_copy(repo: Path, study: str) -> None:
    for path in sorted((repo / "params" / study).glob("*.yaml")):
        assert load_params(study, path.stem, repo)
