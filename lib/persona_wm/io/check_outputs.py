"""Re-run a study and compare its metrics.json with the committed one, within per-key tolerances.

Usage::

    python -m persona_wm.io.check_outputs --study S [--params default] [--against FILE] [--threads N]
    python -m persona_wm.io.check_outputs --study S --metrics FILE [--against FILE]   # compare only

Why: the committed ``outputs/<study>/metrics.json`` were produced on one machine (a 2-core CPU,
1 torch thread). On another machine float results differ a little (thread count, BLAS kernels,
summation order), so a byte-for-byte comparison says nothing; ``lib/persona_wm/io/tolerances.yaml`` says, per
study and key, how much drift is expected, and this module reports every key beyond it.

Without ``--metrics`` the study is executed by :func:`persona_wm.io.runner.run_study` into a scratch
directory, never into ``outputs/`` (caches under ``.cache/`` are shared as usual, so on a machine
that already trained the models the rerun is warm). Exit code: 0 every key within tolerance,
1 some key outside it, 2 the check could not run (unknown study, missing file, failed study), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_wm.core.files import PACKAGE_ROOT, REPO_ROOT
from persona_wm.io import runner
from persona_wm.io.outputs import read_metrics
from persona_wm.io.params import ParamsError, display_path, params_path, parse_yaml

TOLERANCES_PATH: Path = PACKAGE_ROOT / "io" / "tolerances.yaml"
CATCH_ALL = "*"


class CheckError(ValueError):
    """The check cannot run (a missing or unreadable file); the message is the one line to print."""


class ToleranceError(CheckError):
    """lib/persona_wm/io/tolerances.yaml is malformed or has no entry for a study; the message says which."""


class _Missing:
    """Stands for the value of a key that one of the two files does not have."""

    def __repr__(self) -> str:
        return "<missing>"


MISSING: Any = _Missing()


# --------------------------------------------------------------------------------------------
# Rules


@dataclass(frozen=True)
class Rule:
    """One entry of a study's list in tolerances.yaml: a key glob and a tolerance, or a skip."""

    keys: str
    rel: float = 0.0
    abs: float = 0.0
    skip: str | None = None

    def matches(self, key: str) -> bool:
        return fnmatch.fnmatchcase(key, self.keys)

    def accepts(self, new: Any, old: Any) -> bool:
        """Numbers within ``abs + rel * |old|``; anything else (str, bool, None, {}) must be equal."""
        if _is_number(new) and _is_number(old):
            new, old = float(new), float(old)
            if not (math.isfinite(new) and math.isfinite(old)):  # NaN equals NaN, inf only inf
                return new == old or (math.isnan(new) and math.isnan(old))
            return abs(new - old) <= self.abs + self.rel * abs(old)
        return type(new) is type(old) and new == old

    def describe(self) -> str:
        if self.skip is not None:
            return f'skip "{self.keys}" ({self.skip})'
        if self.rel == 0 and self.abs == 0:
            return f'exact ("{self.keys}")'
        return f'rel {self.rel:g}, abs {self.abs:g} ("{self.keys}")'


@dataclass(frozen=True)
class Mismatch:
    """A key outside its tolerance. ``old``/``new`` are MISSING where one file lacks the key."""

    key: str
    old: Any
    new: Any
    rule: str

    def __str__(self) -> str:
        gap = ""
        if _is_number(self.old) and _is_number(self.new):
            gap = f"  |diff| {abs(float(self.new) - float(self.old)):.3g}"
        return f"{self.key}: committed {_show(self.old)}, new {_show(self.new)}{gap}; tolerance {self.rule}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _show(value: Any) -> str:
    if value is MISSING:
        return "<missing>"
    if isinstance(value, float):
        return f"{value:.10g}"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def rule_for(key: str, rules: Sequence[Rule]) -> Rule:
    """The first rule matching ``key``; a list without a match compares exactly."""
    return next((r for r in rules if r.matches(key)), Rule(keys="(no rule matched)"))


# --------------------------------------------------------------------------------------------
# Comparison


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(key, leaf)`` pairs: ``a.b`` for dict items, ``a[3]`` for list items.

    Empty dicts and lists are leaves themselves, so ``{}`` against ``[]`` is still a mismatch.
    """
    if isinstance(value, Mapping) and value:
        for key, item in value.items():
            yield from flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value:
        for i, item in enumerate(value):
            yield from flatten(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def compare_metrics(new: Mapping[str, Any], old: Mapping[str, Any], rules: Sequence[Rule]) -> list[Mismatch]:
    """Every key of ``new`` or ``old`` that its rule does not accept, in ``old``'s key order.

    Keys matched by a skip rule are ignored, presence included; any other key present in only
    one of the two is a mismatch.
    """
    return _compare(new, old, rules)[0]


def _compare(new: Mapping[str, Any], old: Mapping[str, Any], rules: Sequence[Rule]) -> tuple[list[Mismatch], int, int]:
    """(mismatches, keys compared, keys skipped)."""
    new_flat, old_flat = dict(flatten(new)), dict(flatten(old))
    keys = list(old_flat) + [k for k in new_flat if k not in old_flat]
    mismatches: list[Mismatch] = []
    compared = skipped = 0
    for key in keys:
        rule = rule_for(key, rules)
        if rule.skip is not None:
            skipped += 1
            continue
        compared += 1
        old_value, new_value = old_flat.get(key, MISSING), new_flat.get(key, MISSING)
        if old_value is MISSING or new_value is MISSING or not rule.accepts(new_value, old_value):
            mismatches.append(Mismatch(key, old_value, new_value, rule.describe()))
    return mismatches, compared, skipped


# --------------------------------------------------------------------------------------------
# tolerances.yaml

_RULE_FIELDS = {"keys", "rel", "abs", "skip"}


def load_all_tolerances(path: Path = TOLERANCES_PATH) -> dict[str, list[Rule]]:
    """Parse and validate the whole file: study -> rules, each list ending with the catch-all."""
    path = Path(path)
    where = display_path(path, REPO_ROOT)
    try:
        raw = parse_yaml(path.read_text(encoding="utf-8"), where)  # 1e-3 is a float there
    except (OSError, ParamsError) as err:
        raise ToleranceError(str(err)) from None
    if not isinstance(raw, dict):
        raise ToleranceError(f"{where}: top level must map study names to lists of rules")
    return {str(study): _parse_rules(rules, f"{where}: {study}") for study, rules in raw.items()}


def load_tolerances(study: str, path: Path = TOLERANCES_PATH) -> list[Rule]:
    """The ordered rules of one study; ToleranceError if the file has none for it."""
    every = load_all_tolerances(path)
    if study not in every:
        where = display_path(Path(path), REPO_ROOT)
        raise ToleranceError(f"{where} has no rules for study '{study}' (it has: {', '.join(every) or 'none'})")
    return every[study]


def _parse_rules(raw: Any, where: str) -> list[Rule]:
    if not isinstance(raw, list) or not raw:
        raise ToleranceError(f"{where}: expected a non-empty list of rules")
    rules = [_parse_rule(item, f"{where}, rule {i + 1}") for i, item in enumerate(raw)]
    if rules[-1].keys != CATCH_ALL:
        raise ToleranceError(f'{where}: the last rule must be the catch-all keys: "{CATCH_ALL}"')
    return rules


def _parse_rule(item: Any, where: str) -> Rule:
    if not isinstance(item, dict):
        raise ToleranceError(f"{where}: expected a mapping such as {{keys: '*', rel: 0.05, abs: 1.0e-3}}")
    unknown = sorted(set(item) - _RULE_FIELDS)
    if unknown:
        raise ToleranceError(f"{where}: unknown field '{unknown[0]}' (fields: keys, rel, abs | keys, skip)")
    keys = item.get("keys")
    if not isinstance(keys, str) or not keys:
        raise ToleranceError(f"{where}: 'keys' must be a non-empty glob string")
    if "skip" in item:
        if "rel" in item or "abs" in item:
            raise ToleranceError(f"{where} ({keys}): a skip rule takes no rel/abs")
        if not isinstance(item["skip"], str) or not item["skip"].strip():
            raise ToleranceError(f"{where} ({keys}): 'skip' must be the reason, as a string")
        return Rule(keys=keys, skip=item["skip"])
    if "rel" not in item and "abs" not in item:
        raise ToleranceError(f"{where} ({keys}): give rel and/or abs, or skip: <reason>")
    values = {}
    for field in ("rel", "abs"):
        value = item.get(field, 0.0)
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ToleranceError(f"{where} ({keys}): '{field}' must be a number >= 0, got {value!r}")
        values[field] = float(value)
    return Rule(keys=keys, **values)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m persona_wm.io.check_outputs",
        description="Re-run a study into a scratch dir (or take --metrics) and compare its metrics.json "
        "with the committed one, within the tolerances of lib/persona_wm/io/tolerances.yaml.",
    )
    add = parser.add_argument
    add("--study", required=True, metavar="S", help="study name, e.g. 02_steering_specificity")
    add("--params", default="default", metavar="NAME", help="params/<study>/NAME.yaml to re-run (default: %(default)s)")
    add("--against", type=Path, metavar="FILE", help="committed metrics (default: outputs/<study>/metrics.json; "
        "for other params outputs/<study>_<params>/metrics.json)")
    add("--metrics", type=Path, metavar="FILE", help="compare this metrics.json instead of re-running the study")
    add("--threads", type=runner.positive_int, metavar="N", help="OMP/MKL threads (and torch_threads, if declared)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, root: Path = REPO_ROOT) -> int:
    """CLI entry point: 0 all keys within tolerance, 1 some outside, 2 the check could not run."""
    args = parse_args(argv)
    try:
        study = runner.resolve_studies([args.study], root)[0]
        rules = load_tolerances(study, Path(root) / "lib" / "persona_wm" / "io" / "tolerances.yaml")
        params_path(study, args.params, root)  # a name inside params/<study>/, never a path
        against = args.against or _default_against(study, args.params, root)
        old = _read(against, root, "committed metrics")
        if args.metrics is not None:
            new = _read(args.metrics, root, "metrics")
            return report(new, old, rules, display_path(Path(args.metrics), root), display_path(against, root))
        params = runner.validate_all([study], args.params, root, args.threads)[study]
    except (runner.StudyError, CheckError, ParamsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix=f"check-outputs-{study}-"))
    print(f"== {study}: re-running params/{study}/{args.params}.yaml into {scratch} "
          f"(outputs/ untouched)", flush=True)
    start = time.perf_counter()
    try:
        final = runner.run_study(study, params, root, args.threads, out_root=scratch)
    except runner.StudyError as err:
        shutil.rmtree(scratch, ignore_errors=True)
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        shutil.rmtree(scratch, ignore_errors=True)
        print("interrupted: outputs/ untouched, scratch dir removed", file=sys.stderr)
        return runner.INTERRUPTED_EXIT
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    print(f"   ran in {time.perf_counter() - start:.1f} s", flush=True)
    new_path = final / "metrics.json"
    try:
        new = _read(new_path, root, "metrics of the rerun")
    except CheckError as err:
        print(f"error: {err} (outputs kept in {final})", file=sys.stderr)
        return 2
    code = report(new, old, rules, "rerun", display_path(against, root))
    if code == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    else:
        print(f"   the rerun's outputs are kept in {final}")
    return code


def report(new: Mapping[str, Any], old: Mapping[str, Any], rules: Sequence[Rule], new_name: str, old_name: str) -> int:
    """Print one line per key outside tolerance and a summary; return the exit code."""
    mismatches, compared, skipped = _compare(new, old, rules)
    for mismatch in mismatches:
        print(f"   MISMATCH {mismatch}")
    verdict = "OK" if not mismatches else "FAIL"
    print(f"{verdict}: {new_name} vs {old_name}: {compared} keys compared, {len(mismatches)} outside tolerance"
          + (f", {skipped} skipped" if skipped else ""), flush=True)
    return 1 if mismatches else 0


def _default_against(study: str, params_name: str, root: Path) -> Path:
    """``outputs/<study>`` holds the default params' result; other params live in ``<study>_<params>``."""
    if params_name == "default":
        return Path(root) / "outputs" / study / "metrics.json"
    path = Path(root) / "outputs" / f"{study}_{params_name}" / "metrics.json"
    if not path.is_file():
        raise CheckError(
            f"outputs/{study}/metrics.json holds the default params' result and there is no "
            f"{display_path(path, root)}; pass --against FILE to compare a '{params_name}' run"
        )
    return path


def _read(path: Path, root: Path, what: str) -> dict[str, Any]:
    try:
        metrics = read_metrics(path)
    except FileNotFoundError:
        raise CheckError(f"{what}: no such file {display_path(Path(path), root)}") from None
    except ValueError as err:  # json.JSONDecodeError
        raise CheckError(f"{what}: {display_path(Path(path), root)} is not valid JSON: {err}") from None
    if not isinstance(metrics, dict):
        raise CheckError(f"{what}: {display_path(Path(path), root)} must hold a JSON object")
    return metrics


if __name__ == "__main__":
    sys.exit(main())
