"""docs/glossary.md holds for the whole public surface: every parameter of a public function or record, every result
view option and every command-line flag is a glossary word, no retired word is back, and the words that carry a
meaning carry only that one (``direction`` is a vector, ``top_k`` one count, ``source`` a Patchscope ``Source``)."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import mi_lenses
from mi_lenses import cli
from mi_lenses.results import Result

GLOSSARY = Path(__file__).resolve().parents[1] / "docs" / "glossary.md"


def _first_cells(text: str) -> list[str]:
    """The backticked words of every table row's first cell (flags as Python words: ``--fit-data`` -> fit_data)."""
    words = []
    for line in text.splitlines():
        if not line.startswith("| `"):
            continue
        cell = line.split("|")[1]
        words += [w.lstrip("-").replace("-", "_") for w in re.findall(r"`([^`]+)`", cell)]
    return words


def _glossary() -> tuple[set[str], set[str], set[str]]:
    """The words, the retired words, and the retired flags (``--images``: gone as a flag, fine as a result field)."""
    text = GLOSSARY.read_text()
    words, retired = text.split("## Retired words")
    identifier = re.compile(r"^-*[A-Za-z_][A-Za-z0-9_-]*$")
    old = [w for w in re.findall(r"^\| ([^|]+)\|", retired, flags=re.M) for w in re.findall(r"`([^`]+)`", w)]
    old = [w for w in old if identifier.match(w)]
    flags = {w.lstrip("-").replace("-", "_") for w in old if w.startswith("--")}
    return set(_first_cells(words)), {w for w in old if not w.startswith("-")}, flags


WORDS, RETIRED, RETIRED_FLAGS = _glossary()
OUTPUT_RECORDS = (Result, mi_lenses.ParityReport)  # measured outputs: their fields are checked for retired words only


def _public() -> list[tuple[str, object]]:
    return [(n, getattr(mi_lenses, n)) for n in mi_lenses.__all__]


def _signatures() -> list[tuple[str, inspect.Signature]]:
    """Every public function's and record's signature (results are checked by their view options and fields)."""
    out = []
    for name, obj in _public():
        if inspect.isclass(obj) and issubclass(obj, (*OUTPUT_RECORDS, BaseException)):
            continue
        if inspect.isfunction(obj) or inspect.isclass(obj):
            out.append((name, inspect.signature(obj)))
    return out


def _parameters() -> dict[str, set[str]]:
    """Parameter name -> where it is used (function names, ``Result.view`` for view options)."""
    used: dict[str, set[str]] = {}
    for name, sig in _signatures():
        for p in sig.parameters.values():
            if p.name not in ("self", "cls"):
                used.setdefault(p.name, set()).add(name)
    for name, obj in _public():
        if inspect.isclass(obj) and issubclass(obj, Result):
            for option in obj.view_options:
                used.setdefault(option, set()).add(f"{name}.view")
    return used


def _result_fields() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for name, obj in _public():
        if inspect.isclass(obj) and issubclass(obj, OUTPUT_RECORDS) and dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                used.setdefault(f.name, set()).add(name)
    return used


def _flags() -> list[tuple[str, argparse.Action]]:
    """(command, action) for every flag and positional argument of every ``mi-lenses`` command."""
    out = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    walk(sub, f"{command} {sub_name}".strip())
            elif not isinstance(action, argparse._HelpAction) and command:
                out.append((command, action))

    walk(cli._parser(), "")
    return out


def test_the_glossary_parses():
    """The page has words and retired words, and no word is both."""
    assert {"prompt", "answer", "direction", "mode", "top_k", "layers", "source", "data"} <= WORDS
    assert {"input", "texts", "target_token", "pipe"} <= RETIRED and {"sample", "images"} <= RETIRED_FLAGS
    assert not WORDS & RETIRED, f"both a word and retired: {sorted(WORDS & RETIRED)}"


def test_every_public_parameter_is_a_glossary_word():
    missing = {p: sorted(where) for p, where in _parameters().items() if p not in WORDS}
    assert not missing, f"parameters missing from docs/glossary.md: {missing}"


def test_no_retired_word_is_a_parameter_a_result_field_or_a_flag():
    back = {p: sorted(w) for p, w in {**_result_fields(), **_parameters()}.items() if p in RETIRED}
    back.update({a.dest: [c] for c, a in _flags() if a.dest in RETIRED | RETIRED_FLAGS})
    back.update({s: [c] for c, a in _flags() for s in a.option_strings
                 if s.lstrip("-").replace("-", "_") in RETIRED | RETIRED_FLAGS})
    assert not back, f"retired words are back (docs/glossary.md says what replaces them): {back}"


def test_every_flag_is_the_python_word():
    """A flag is its Python word with ``-`` for ``_`` (``--no-X`` switches off ``X``; an appending flag takes one
    item of its plural word, as ``--target`` of ``targets``), and that word is in the glossary."""
    wrong = []
    for command, action in _flags():
        word = action.dest[3:] if action.dest.startswith("no_") else action.dest
        if word not in WORDS:
            wrong.append(f"{command}: {action.dest} is no glossary word")
            continue
        for flag in action.option_strings:
            spelled = flag.lstrip("-").replace("-", "_")
            spelled = spelled[3:] if spelled.startswith("no_") else spelled
            if spelled != word and not (isinstance(action, argparse._AppendAction) and spelled + "s" == word):
                wrong.append(f"{command}: {flag} is not the flag of {word}")
    assert not wrong, wrong


@pytest.mark.parametrize("word,meaning,check", [
    ("direction", "a vector (Tensor)", lambda a: "Tensor" in a),
    ("top_k", "one count (int)", lambda a: a == "int"),
    ("source", "a Patchscope Source", lambda a: "Source" in a),
    ("layer", "one block (no Sequence)", lambda a: "Sequence" not in a and "IndexSpec" not in a),
    ("position", "one position (no Sequence)", lambda a: "Sequence" not in a and "IndexSpec" not in a),
    ("mode", "denoise or noise", lambda a: "Literal" in a or "Mode" in a),
])
def test_a_word_means_one_thing(word, meaning, check):
    """Where a word is a parameter, its annotation is that one thing."""
    seen = 0
    for name, sig in _signatures():
        p = sig.parameters.get(word)
        if p is None:
            continue
        seen += 1
        annotation = p.annotation if isinstance(p.annotation, str) else inspect.formatannotation(p.annotation)
        assert check(annotation), f"{name}({word}: {annotation}): {word} means {meaning} (docs/glossary.md)"
    assert seen, f"no public parameter named {word}: update docs/glossary.md and this test"


COMMANDS = {  # command -> the Python entry points whose keywords its flags are
    "logit-lens": ["logit_lens"], "dla": ["direct_logit_attribution"], "report": ["report"],
    "patchscope": ["patchscope", "sweep", "Source", "Target"], "patch": ["activation_patching", "edge_attribution",
                                                                         "faithfulness"],
    "compare": ["compare_lenses"], "diffusion-lens": ["diffusion_lens"], "tuned-lens train": ["TrainConfig"],
    "tuned-lens eval": ["evaluate_lens"], "train-dictionary": ["DictionaryTrainConfig"],
    "evaluate-dictionary": ["evaluate_dictionary"], "feature-contexts": ["feature_contexts"],
    "graph": ["attribution_graph"],
}


def test_a_flag_has_its_python_default():
    """Where a flag is a keyword of the entry points its command calls, it has the default of one of them (None on
    either side leaves the choice to the other: the entry point's own default, or a preset the flag names)."""
    signatures = dict(_signatures())
    differ = []
    for command, action in _flags():
        params = [(e, signatures[e].parameters.get(action.dest)) for e in COMMANDS.get(command, [])]
        params = [(e, p) for e, p in params if p is not None and p.default is not inspect.Parameter.empty]
        if not params or action.default is None or any(p.default is None for _, p in params):
            continue
        default = action.default
        if isinstance(default, str) and "," in default:  # a comma list
            default = tuple(int(x) for x in default.split(","))
        if all(default != (tuple(p.default) if isinstance(p.default, list) else p.default) for _, p in params):
            differ.append(f"{command} --{action.dest.replace('_', '-')}: {action.default!r} vs "
                          + ", ".join(f"{e}({action.dest}={p.default!r})" for e, p in params))
    assert not differ, differ


def test_every_command_is_mapped():
    commands = {c for c, _ in _flags()}
    assert commands <= set(COMMANDS) | {"tuned-lens"}, sorted(commands - set(COMMANDS))
