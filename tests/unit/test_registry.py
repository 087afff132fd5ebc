"""The process registry: one name grammar, canonical names that round-trip, one error per bad part."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from persona_wm.core import registry
from persona_wm.core.ghmm import GHMM, ProcessError, check_number
from persona_wm.core.names import format_literal, parse_name
from persona_wm.core.registry import canonical_name, describe, families, family, process_knobs, process_name
from persona_wm.core.sfp import leaky, restrict_to_sector, semi_factored_process
from persona_wm.processes import REGISTRY, get_process, mess3, pp_mess3, pp_z1r, z1r
from persona_wm.processes.em import EMConfig, em_name, em_process, parse_em_name

PARAMS = Path(__file__).resolve().parents[2] / "params"

#: Families whose knobs have no default (they wrap another process): an example name for each.
REQUIRED_KNOB_EXAMPLES = {
    "restricted": "restricted(process='semi_factored',sectors=('(0,0)',))",
    "leaky": "leaky(process='z1r',epsilon=0.1)",
    "sfp": "sfp(factors=('pp_z1r','pp_z1r'))",
}


def _same_process(a: GHMM, b: GHMM) -> None:
    for field in ("transfer", "initial", "right"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=f"{a.name}: {field}")
    assert (a.partition, a.partition_labels, a.factor_states, a.factor_tokens) == (
        b.partition, b.partition_labels, b.factor_states, b.factor_tokens)


def _round_trips(name: str) -> GHMM:
    process = get_process(name)
    again = get_process(process.name)
    assert again.name == process.name, f"{name!r} prints {process.name!r}, which rebuilds as {again.name!r}"
    _same_process(process, again)
    return process


# --------------------------------------------------------------------------- every family
@pytest.mark.parametrize("name", sorted(families()))
def test_every_family_builds_by_its_bare_name_or_example(name: str) -> None:
    signature = families()[name]
    required = [k for k, p in signature.parameters.items() if p.default is p.empty]
    if required:
        assert name in REQUIRED_KNOB_EXAMPLES, f"family {name} needs knobs {required}: add an example above"
        process = _round_trips(REQUIRED_KNOB_EXAMPLES[name])
        with pytest.raises(ProcessError, match=rf"'{name}': \S+ needs knobs? {required[0]}"):
            get_process(name)
    else:
        process = _round_trips(name)
        assert process.name in (name, f"{name}()")
        assert get_process(f"{name}()").name == process.name  # "family" and "family()" are one process
    assert process.n_states >= 1 and describe(name).startswith(f"{name}(")


# --------------------------------------------------------------------------- names round-trip
ROUND_TRIP = [
    "z1r", "mess3", "mess3()", "mess3(x=0.1)", "mess3(alpha=0.5,x=0.1)", "mess3(x=0.15,alpha=0.6)",
    "pp_z1r_x_pp_z1r", "z1r_x_mess3_x_pp_z1r", "pp_mess3(first=(0.1,0.5))", "pp_mess3(second=[0.05, 0.9])",
    "pp_mess3(first=(0.1,0.5))_x_mess3(alpha=0.7)", "semi_factored", "semi_factored(correlation=0.0)",
    "semi_factored(correlation=0.25)_x_z1r",
    "em()", "em", "em(mixing=0.25)", "em(coupling=0.0,shared_answers=False)", "em(mixing=0.0,persona_dim=4)",
    "em(n_personas=3,persona_dim=1,n_tasks=2,mixing=0.1,coupling=0.5,shared_answers=False,leak=0.01)",
    "em( mixing = 1.0 , coupling = 0.25 )", "em(mixing=1)", "z1r_x_em(n_tasks=1)",
    "leaky(process='pp_z1r_x_pp_z1r',epsilon=0.05)", "leaky(process='em(mixing=1.0)',epsilon=0.01)",
    "leaky(process=\"mess3()\",epsilon=0.1)_x_z1r",
    "restricted(process='em()',sectors=('(mis,t0b)',))", "restricted(process='semi_factored',sectors=('(0,0)','(1,1)'))",
    "restricted(process=\"leaky(process='pp_z1r_x_pp_z1r',epsilon=0.1)\",sectors=('(S0,S1SR)',))",
    "sfp(factors=('pp_z1r','pp_z1r'),correlation=0.5)", "sfp(factors=('pp_mess3','pp_mess3'),correlation=1.0)",
    "sfp(factors=('pp_z1r','pp_z1r','pp_z1r'),correlation=0.3,weights=(0.25,0.75))",
]


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_names_round_trip(name: str) -> None:
    _round_trips(name)


def test_canonical_names_are_printed_as_documented() -> None:
    expected = {
        "mess3()": "mess3", "mess3(x=0.15,alpha=0.6)": "mess3", "mess3(alpha=0.5,x=0.1)": "mess3(x=0.1,alpha=0.5)",
        "pp_mess3(second=[0.05, 0.9])": "pp_mess3(second=(0.05,0.9))", "em": "em()",
        "em( mixing = 1.0 , coupling = 0.25 )": "em(mixing=1.0,coupling=0.25)",
        "em(mixing=0.0,persona_dim=4)": "em(persona_dim=4,mixing=0.0)", "em(shared_answers=True)": "em()",
        "leaky(process=\"mess3()\",epsilon=0.1)_x_z1r": "leaky(process='mess3',epsilon=0.1)_x_z1r",
        "sfp(factors=['pp_z1r', 'pp_z1r'],correlation=0)": "sfp(factors=('pp_z1r','pp_z1r'))",
    }
    for name, canonical in expected.items():
        assert get_process(name).name == canonical, name
        assert canonical_name(name) == canonical, name


def test_core_wrappers_print_names_the_registry_rebuilds() -> None:
    """restrict_to_sector, leaky and semi_factored_process name their result so that get_process rebuilds it."""
    em = get_process("em()")
    cases = [
        restrict_to_sector(em, "(mis,t0b)"),
        restrict_to_sector(get_process("semi_factored"), ["(0,0)", "(1,1)"]),
        leaky(get_process("pp_z1r_x_pp_z1r"), 0.05),
        leaky(restrict_to_sector(get_process("pp_z1r_x_pp_z1r"), "(S0,S0)"), 0.2),
        semi_factored_process([pp_z1r(), pp_z1r()], 0.5),
        semi_factored_process([pp_mess3(), pp_mess3()], 0.0),
        semi_factored_process([pp_z1r(), pp_z1r()], 0.25, weights=np.array([0.3, 0.7])),
    ]
    assert cases[0].name == "restricted(process='em()',sectors=('(mis,t0b)',))"
    assert cases[2].name == "leaky(process='pp_z1r_x_pp_z1r',epsilon=0.05)"
    assert cases[4].name == "sfp(factors=('pp_z1r','pp_z1r'),correlation=0.5)"
    for process in cases:
        rebuilt = get_process(process.name)
        assert rebuilt.name == process.name
        _same_process(process, rebuilt)
    assert leaky(z1r(), 0.1, name="mine").name == "mine"  # an explicit name still wins
    assert get_process("em(leak=0.02)").name == "em(leak=0.02)"


def test_direct_builder_calls_print_canonical_names() -> None:
    assert mess3(0.1, 0.5).name == "mess3(x=0.1,alpha=0.5)" == get_process("mess3(x=0.1,alpha=0.5)").name
    assert mess3().name == "mess3" and pp_mess3(first=(0.1, 0.5)).name == "pp_mess3(first=(0.1,0.5))"
    _same_process(mess3(0.1, 0.5), get_process("mess3(x=0.1,alpha=0.5)"))


def test_em_names_stay_byte_identical_and_go_through_the_registry() -> None:
    assert em_name(EMConfig()) == "em()"
    assert em_name(EMConfig(mixing=0.25)) == "em(mixing=0.25)"
    assert em_name(EMConfig(coupling=0.0, shared_answers=False)) == "em(coupling=0.0,shared_answers=False)"
    assert em_name(EMConfig(mixing=np.float64(0.25))) == "em(mixing=0.25)"  # not 'np.float64(0.25)'
    config = EMConfig(n_personas=3, mixing=0.8, n_tasks=4, leak=0.01)
    assert parse_em_name(em_name(config)) == config and parse_em_name("em") == EMConfig()
    assert em_name(config) == process_name("em", **{k: getattr(config, k) for k in families()["em"].parameters})
    assert em_process(config).name == em_name(config)
    assert list(families()["em"].parameters) == list(EMConfig.__dataclass_fields__)
    with pytest.raises(ProcessError, match=r"'z1r' is not a name of the EM-SFP family"):
        parse_em_name("z1r")
    with pytest.raises(ProcessError, match=r"product of 2 processes"):
        parse_em_name("em()_x_em()")


def test_process_knobs_fills_in_defaults() -> None:
    family_name, knobs = process_knobs("mess3(alpha=0.5)")
    assert family_name == "mess3" and knobs == {"x": 0.15, "alpha": 0.5}
    assert process_name("mess3", alpha=0.6, x=0.15) == "mess3"


@pytest.mark.parametrize("path", sorted(PARAMS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_params_process_name_round_trips(path: Path) -> None:
    data = yaml.safe_load(path.read_text()) or {}
    names = []
    for key, value in data.items():
        if key in ("process", "processes") or key.endswith(("_process", "_processes")):
            values = value.values() if isinstance(value, dict) else [value]
            for item in values:
                names += [item] if isinstance(item, str) else [n for n in item or [] if isinstance(n, str)]
    for name in names:
        process = _round_trips(name)
        if name.startswith("em("):  # the em names in params are the cache keys of trained models
            assert em_name(parse_em_name(name)) == process.name


# --------------------------------------------------------------------------- bad names
BAD = [
    ("empty", "", r"process name must be a non-empty string, got ''"),
    ("blank", "  ", r"non-empty string"),
    ("not-a-string", 3, r"non-empty string, got 3"),
    ("unknown-family", "mess3_x_mess4", r"unknown process 'mess4' in 'mess3_x_mess4'; known processes: mess3, pp_mess3"),
    ("unknown-family-wrapped", "leaky(process='zz',epsilon=0.1)",
     r"^\"leaky\(process='zz',epsilon=0.1\)\": leaky: process: unknown process 'zz' in 'zz'"),
    ("unknown-knob", "mess3(y=0.1)", r"unknown mess3 knob 'y' in 'mess3\(y=0.1\)'; knobs: x, alpha$"),
    ("unknown-knob-no-knobs", "z1r(a=1)", r"unknown z1r knob 'a' .* knobs: none \(z1r takes no knobs\)"),
    ("unknown-knob-in-product", "z1r_x_em(mood=1)", r"unknown EM-SFP knob 'mood' in 'em\(mood=1\)' \(in 'z1r_x_em\(mood=1\)'\)"),
    ("repeated-knob", "mess3(x=0.1,x=0.2)", r"mess3 knob 'x' is given twice in 'mess3\(x=0.1,x=0.2\)'"),
    ("unreadable-literal", "mess3(x=0.1.2)", r"mess3 knob 'x' in 'mess3\(x=0.1.2\)' has an unreadable value '0.1.2'"),
    ("call-is-not-a-literal", "em(mixing=float('nan'))", r"EM-SFP knob 'mixing' .* unreadable value \"float\('nan'\)\""),
    ("positional", "mess3(0.1,0.5)", r"mess3 argument '0.1' in 'mess3\(0.1,0.5\)' is not key=value"),
    ("wrong-type-bool", "mess3(x=True)", r"^'mess3\(x=True\)': mess3: x must be a finite number, got True \(bool\)$"),
    ("wrong-type-string", "em(n_tasks='3')", r"^\"em\(n_tasks='3'\)\": EM-SFP: n_tasks must be an integer, got '3' \(str\)$"),
    ("wrong-type-float-for-int", "em(persona_dim=2.0)", r"persona_dim must be an integer, got 2.0 \(float\)"),
    ("wrong-type-infinite", "em(mixing=1e999)", r"mixing must be a finite number, got inf \(float\)"),
    ("wrong-tuple-length", "pp_mess3(first=(0.1,))",
     r"pp_mess3: first must be a tuple of 2 items \(a finite number, a finite number\), got \(0.1,\) \(tuple\)"),
    ("wrong-tuple-item", "sfp(factors=('pp_z1r',2))", r"factors must be a tuple whose items are each a process name"),
    ("wrong-optional", "sfp(factors=('pp_z1r','pp_z1r'),weights='even')",
     r"weights must be a tuple whose items are each a finite number, or None, got 'even' \(str\)"),
    ("missing-knob", "leaky(process='z1r')", r"^\"leaky\(process='z1r'\)\": leaky needs knob epsilon \(knobs: leaky\(process: ProcessName, epsilon: float\)\)"),
    ("range-from-builder", "mess3(x=0.7)", r"^'mess3\(x=0.7\)': mess3 needs 0 < x < 0.5"),
    ("range-from-builder-in-product", "z1r_x_em(mixing=2.0)", r"^'em\(mixing=2.0\)' \(in 'z1r_x_em\(mixing=2.0\)'\): EM-SFP mixing must lie in \[0, 1\]"),
    ("unclosed-paren", "em(mixing=0.5", r"unbalanced parentheses in 'em\(mixing=0.5': '\(' at position 2 is never closed"),
    ("extra-close-paren", "z1r)", r"unbalanced parentheses in 'z1r\)': '\)' at position 3 has no opening bracket"),
    ("mismatched-brackets", "pp_mess3(first=(0.1,0.5])", r"'\(' at position 15 is closed by '\]' at position 23"),
    ("unclosed-quote", "leaky(process='z1r,epsilon=0.1)", r"unclosed quote in .* position 14 is never closed"),
    ("text-after-term", "em(mixing=0.5)x", r"unexpected text 'x' after the closing '\)' of 'em\(mixing=0.5\)x'"),
    ("trailing-separator", "z1r_x_", r"empty factor in process name 'z1r_x_': nothing after the last '_x_'"),
    ("leading-separator", "_x_z1r", r"nothing before the first '_x_'"),
    ("double-separator", "z1r_x__x_z1r", r"nothing between two '_x_'"),
    ("not-an-identifier", "z1r-x", r"process family 'z1r-x' in 'z1r-x' is not a name"),
    ("sector-of-another-process", "restricted(process='z1r',sectors=('(0,0)',))", r"unknown sector '\(0,0\)' of 'z1r'"),
]


@pytest.mark.parametrize("name, message", [row[1:] for row in BAD], ids=[row[0] for row in BAD])
def test_bad_names_raise_one_process_error_naming_the_part(name, message) -> None:
    with pytest.raises(ProcessError, match=message):
        get_process(name)


def test_bad_table_ids_are_unique() -> None:
    assert len({row[0] for row in BAD}) == len(BAD)


def test_process_name_checks_knobs_like_a_parsed_name() -> None:
    with pytest.raises(ProcessError, match=r"unknown EM-SFP knob 'mood'"):
        process_name("em", mood=1)
    with pytest.raises(ProcessError, match=r"unknown process 'nope'"):
        process_name("nope")
    with pytest.raises(ProcessError, match=r"mixing must be a finite number, got 'x' \(str\)"):
        process_name("em", mixing="x")


def test_grammar_splits_only_outside_quotes_and_brackets() -> None:
    terms = parse_name("leaky(process='a_x_b',epsilon=0.1)_x_mess3(x=0.1)_x_f(t=(1,'_x_'),s=\"it's\")")
    assert [t.family for t in terms] == ["leaky", "mess3", "f"]
    assert dict(terms[0].knobs) == {"process": "a_x_b", "epsilon": 0.1}
    assert dict(terms[2].knobs) == {"t": (1, "_x_"), "s": "it's"}
    assert format_literal((1, "a", (2.5,), None, True)) == "(1,'a',(2.5,),None,True)"
    assert format_literal("it's") == '"it\'s"'


# --------------------------------------------------------------------------- adding a process
def test_adding_a_process_is_one_decorator(monkeypatch) -> None:
    """The module docstring's example, verbatim: a family registered here is a process everywhere."""
    monkeypatch.setattr(registry, "REGISTRY", dict(registry.REGISTRY))
    monkeypatch.setattr(registry, "_INFO", dict(registry._INFO))

    @family("coin")
    def coin(p: float = 0.5) -> GHMM:  # one state emitting token 1 with probability p
        check_number(p, "p", 0.0, 1.0, owner="coin")  # ranges are the builder's business
        return GHMM(np.array([[[1 - p]], [[p]]]), np.ones(1))

    assert registry.get_process("coin").name == "coin"
    joint = registry.get_process("coin(p=0.9)_x_z1r")
    assert joint.name == "coin(p=0.9)_x_z1r" and joint.n_tokens == 4
    np.testing.assert_array_equal(joint.transfer[2:].sum(0), 0.9 * z1r().transfer.sum(0))
    assert str(registry.families()["coin"]).startswith("(p: float = 0.5)") and coin(0.9).name == "coin(p=0.9)"
    with pytest.raises(ProcessError, match=r"'coin\(p=1.5\)': coin: p must be a finite number in \[0, 1\]"):
        registry.get_process("coin(p=1.5)")
    with pytest.raises(ProcessError, match=r"already registered"):
        family("coin")(lambda p=0.5: coin(p))
    with pytest.raises(ProcessError, match=r"must be an identifier without '_x_'"):
        family("coin_x_die")
    with pytest.raises(ProcessError, match=r"must be a named parameter"):
        family("dice")(lambda *sides: coin())


def test_registry_is_the_dict_get_process_reads(monkeypatch) -> None:
    """``REGISTRY`` (re-exported by persona_wm.processes) is what get_process looks up at every call."""
    assert REGISTRY is registry.REGISTRY
    original = REGISTRY["z1r"]
    monkeypatch.setitem(REGISTRY, "z1r", lambda: original().with_initial(np.array([1.0, 0.0, 0.0])))
    assert get_process("z1r").initial.tolist() == [1.0, 0.0, 0.0] and get_process("z1r").name == "z1r"


def test_families_lists_every_family_with_its_knobs() -> None:
    listed = families()
    assert {"z1r", "mess3", "pp_z1r", "pp_mess3", "semi_factored", "em", "restricted", "leaky", "sfp"} <= set(listed)
    assert list(listed["mess3"].parameters) == ["x", "alpha"]
    assert describe("mess3") == "mess3(x: float = 0.15, alpha: float = 0.6)"
    assert re.fullmatch(r"em\(n_personas: int = 2, .*, leak: float = 0.0\)", describe("em"))
