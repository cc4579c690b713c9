"""The public surface: one decode path, explicit typed signatures, one result protocol (checked when a result class
is defined), and every top-level name importable from ``mi_lenses``."""

from __future__ import annotations

import ast
import dataclasses
import gc
import inspect
import json
import sys
import typing
from pathlib import Path

import pytest
import torch

import mi_lenses
from conftest import PROMPT, PROMPTS, hook_counts
from mi_lenses.errors import VerificationError
from mi_lenses.models.decode import Decoder
from tolerance import TIGHT

PACKAGE = Path(mi_lenses.__file__).parent


# ------------------------------------------------------------------------------------------------ one decode path
def test_decoding_is_written_once():
    """No module but ``models/decode.py`` normalises with the final norm's statistics, applies the soft-cap or folds
    the unembedding: a lens, the statistics, training and DLA all go through the Decoder."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "decode.py":
            continue
        text = path.read_text()
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("rsqrt", "tanh", "atanh", "softcap"):
                if not (path.name == "train.py" and node.attr == "softcap"):
                    offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} .{node.attr}")
    assert not offenders, f"decoding written outside the Decoder: {offenders}"


def test_breaking_the_decoder_breaks_every_lens(builder, monkeypatch):
    """Break the one decoder in one place (its epsilon): every lens's identity check and DLA fail, and training's
    objective no longer matches the model. If any of them had a copy of the decode, it would still pass."""
    tm = builder.get("llama_tied", "raw")  # eps 2e-2: a wrong epsilon is visible
    m = tm.model
    tokens = m.to_tokens(PROMPT)
    real = Decoder.from_model

    def broken(model):
        return dataclasses.replace(real(model), eps=real(model).eps * 50)

    mi_lenses.logit_lens(m, tokens).verify()  # healthy first
    monkeypatch.setattr(Decoder, "from_model", classmethod(lambda cls, model: broken(model)))
    monkeypatch.setattr("mi_lenses.models.decode._CACHE", type(mi_lenses.models.decode._CACHE)())
    with pytest.raises(VerificationError):
        mi_lenses.logit_lens(m, tokens)
    with pytest.raises(VerificationError):
        mi_lenses.TunedLens.from_model(m)(m, tokens)
    with pytest.raises(VerificationError):
        mi_lenses.direct_logit_attribution(m, tokens, answer="Paris")
    with pytest.raises(VerificationError):
        mi_lenses.evaluate_lens(mi_lenses.TunedLens.from_model(m), m, tokens)
    from mi_lenses.lenses.tuned.train import _Objective

    obj = _Objective(mi_lenses.ModelView(m))
    hs = obj.hidden(tokens)
    p = obj.final(hs[-1]).p
    with torch.no_grad():
        own = m(tokens)[0].float().softmax(-1)
    assert (p - own).abs().max() > 1e-3, "the training objective does not decode through the Decoder"


def test_decoder_is_built_once_and_rebuilt_when_weights_change(builder):
    m = builder.get("gpt2", "raw").model
    view = mi_lenses.ModelView(m)
    first = view.decoder
    assert mi_lenses.ModelView(m).decoder is first  # another view of the same model: the same decoder
    gain = m.ln_final._original_component.weight
    with torch.no_grad():
        gain.mul_(2.0)
    try:
        assert view.decoder is not first and torch.allclose(view.decoder.gain, first.gain * 2)
    finally:
        with torch.no_grad():
            gain.div_(2.0)
    assert torch.equal(view.decoder.gain, first.gain)


# ------------------------------------------------------------------------------------------------ signatures
def _params(fn, drop=()):
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default, p.annotation) for p in sig.parameters.values() if p.name not in drop]


def test_lens_entry_points_share_one_explicit_signature():
    ref = _params(mi_lenses.run_lens, drop=("lens",))
    assert _params(mi_lenses.logit_lens) == ref
    assert _params(mi_lenses.Lens.__call__, drop=("self",)) == ref
    assert _params(mi_lenses.tuned_lens, drop=("lens",)) == ref
    names = [p[0] for p in ref]
    for option in ("cache", "logits", "attention_mask", "layers", "positions", "point", "top_k", "targets",
                   "return_logits", "prepend_bos", "dtype", "position_chunk", "vocab_tile", "fused", "check"):
        assert option in names
        assert option in inspect.getdoc(mi_lenses.run_lens)


PUBLIC_FUNCTIONS = ["logit_lens", "tuned_lens", "run_lens", "direct_logit_attribution", "neuron_attribution",
                    "patchscope", "sweep", "evaluate_lens", "load_model", "load_lens", "save_lens", "fit_map",
                    "fit_jacobian_lens", "fit_future_lens", "fit_future_prompt", "fit_attribute_lens",
                    "evaluate_attribute_lens", "compare_lenses", "selfie", "diffusion_lens", "attention", "report"]


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_no_kwargs_pass_through(name):
    fn = getattr(mi_lenses, name)
    kinds = [p.kind for p in inspect.signature(fn).parameters.values()]
    assert inspect.Parameter.VAR_KEYWORD not in kinds, f"{name} hides its options behind **kwargs"


@pytest.mark.parametrize("fn,param", [
    (mi_lenses.logit_lens, "point"), (mi_lenses.logit_lens, "dtype"), (mi_lenses.DLAResult.top, "by"),
    (mi_lenses.DLAResult.to_dataframe, "what"), (mi_lenses.LensResult.table, "value"),
    (mi_lenses.save_lens, "format"), (mi_lenses.TunedLens.save, "format"),
    (mi_lenses.fit_jacobian_lens, "backend"), (mi_lenses.compare_lenses, "point"),
    (mi_lenses.LensComparison.table, "metric"),
    (mi_lenses.AttentionResult.table, "value"), (mi_lenses.AttentionResult.to_dataframe, "what"),
    (mi_lenses.AttentionResult.top_heads, "metric"), (mi_lenses.report, "sections"),
])
def test_string_options_are_literal_types(fn, param):
    hints = typing.get_type_hints(fn)
    assert "Literal" in str(hints[param]), f"{fn.__qualname__}({param}) is a plain {hints[param]}"
    occurrence = typing.get_type_hints(mi_lenses.Target)["occurrence"]
    assert "Literal" in str(occurrence)


def test_every_public_name_is_importable_from_the_top():
    for name in mi_lenses.__all__:
        assert getattr(mi_lenses, name) is not None
    for name in ("patchscope", "sweep", "Source", "Target", "tuned_lens", "load_lens", "MiLensesError", "presets"):
        assert name in mi_lenses.__all__


def test_training_flags_are_derived_from_train_config():
    """The CLI's training defaults are TrainConfig's: they cannot drift (``--checkpoint-every`` once did)."""
    from mi_lenses.cli import _parser

    args = _parser().parse_args(["tuned-lens", "train", "--data", "x", "--out", "y"])
    for f in dataclasses.fields(mi_lenses.TrainConfig):
        if f.metadata.get("cli", True):
            assert getattr(args, f.name) == f.default, f.name


def test_shared_flags_come_from_one_parent_parser():
    from mi_lenses.cli import _parser

    p = _parser()
    for argv in (["logit-lens", "x"], ["dla", "x", "--answer", "y"], ["patchscope", "--source-prompt", "x"],
                 ["tuned-lens", "eval", "--lens", "a", "--data", "b"]):
        args = p.parse_args(argv + ["--model", "M", "--device", "meta"])
        assert (args.model, args.device) == ("M", "meta")


# ------------------------------------------------------------------------------------------------ the result protocol
@pytest.fixture(scope="module")
def results(builder, tmp_path_factory):
    m = builder.get("llama_gqa", "raw").model
    tokens = torch.randint(3, m.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    corrupted = PROMPT.replace("France", "Rome")
    edges = mi_lenses.edge_attribution(m, PROMPT, corrupted, answer=" city")
    return {
        "LensResult": mi_lenses.logit_lens(m, PROMPTS, targets=" city"),
        "DLAResult": mi_lenses.direct_logit_attribution(m, PROMPTS, answer=" city"),
        "PatchscopeResult": mi_lenses.patchscope(m, mi_lenses.Source(PROMPT, layer=[0, 2]),
                                                 mi_lenses.presets.identity(), max_new_tokens=2),
        "SweepResult": mi_lenses.sweep(m, PROMPT, positions=[-1, -2], progress=False),
        "LensEvaluation": mi_lenses.evaluate_lens(mi_lenses.TunedLens.from_model(m), m, tokens),
        "LensComparison": mi_lenses.compare_lenses(m, tokens, ["logit", "patchscope-q"], progress=False),
        "RelationEvaluation": mi_lenses.evaluate_attribute_lens(
            mi_lenses.fit_attribute_lens(m, "The capital of {} is", ["France"], progress=False), m,
            [("Paris", " city"), ("Rome", " city")]),
        "SelfIEResult": mi_lenses.selfie(m, PROMPT, layers=[0, 2], max_new_tokens=3),
        "AttentionResult": mi_lenses.attention(m, PROMPTS),
        "QKTerms": mi_lenses.attention(m, PROMPT).qk_terms(1, 2),
        "Report": mi_lenses.report(m, PROMPT, progress=False),
        "PatchingResult": mi_lenses.activation_patching(m, PROMPT, corrupted, answer=" city", what="head_out",
                                                        progress=False),
        "EdgeAttribution": edges,
        "Circuit": mi_lenses.faithfulness(m, edges.circuit(edges=5)),
        "NeuronAttribution": mi_lenses.neuron_attribution(m, m.run_with_cache(m.to_tokens(PROMPTS))[1],
                                                          answer=" city"),
    }


KINDS = ["LensResult", "DLAResult", "PatchscopeResult", "SweepResult", "LensEvaluation", "LensComparison",
         "RelationEvaluation", "SelfIEResult", "AttentionResult", "QKTerms", "Report", "PatchingResult",
         "EdgeAttribution", "Circuit", "NeuronAttribution"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_result_has_the_same_outputs(results, kind, tmp_path, capsys):
    res = results[kind]
    assert isinstance(res, mi_lenses.Result) and dataclasses.is_dataclass(res)
    page = res.to_html(tmp_path / "r.html")
    assert page == (tmp_path / "r.html").read_text() and page.startswith("<!DOCTYPE html>")
    assert "cdn" not in page.lower() or "jsdelivr" not in page.lower()
    assert res.show()._repr_html_()
    res.print(width=200)
    assert capsys.readouterr().out.strip()
    text = res.to_json(tmp_path / "r.json")
    assert json.loads(text) == json.loads((tmp_path / "r.json").read_text()) == res.to_dict()
    assert "NaN" not in text and "Infinity" not in text
    assert len(res.to_dataframe()) > 0
    with pytest.raises(mi_lenses.LensInputError, match="batch 5 is out of range"):
        res.to_dict(batch=5)


def test_batch_selects_a_prompt_everywhere(results):
    lens, dla = results["LensResult"], results["DLAResult"]
    assert lens.to_dict(batch=2)["tokens"] == lens.str_tokens[2]
    assert dla.to_dict(batch=1)["actual"] == pytest.approx(float(dla.actual[1]), abs=TIGHT)
    assert "A" in lens.to_html(batch=-1) and "A" in dla.to_html(batch=2)


def _result_classes() -> list[type]:
    """Every subclass of Result that mi_lenses defines, found by walking ``__subclasses__()`` (importing mi_lenses
    imports every result module); classes whose definition failed (doctests, tests) are collected first."""
    gc.collect()
    found, todo = [], [mi_lenses.Result]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            module = sys.modules.get(sub.__module__)
            if sub.__module__.startswith("mi_lenses.") and getattr(module, sub.__name__, None) is sub:
                found.append(sub)
    return found


def test_every_result_class_passes_the_definition_time_check():
    from mi_lenses.results import check_protocol

    classes = _result_classes()
    assert {c.__name__ for c in classes} >= set(KINDS) | {"DiffusionLensResult"}
    for cls in classes:
        assert check_protocol(cls) == dict(cls._takes), cls  # what __init_subclass__ found when it was defined
        assert "__repr__" in cls.__dict__, f"{cls.__name__} lost the one-line repr (a @dataclass repr replaced it)"
        for view in ("to_dict", "table", "fragment", "to_dataframe"):
            params = inspect.signature(getattr(cls, view)).parameters
            for name, default in cls.view_options.items():
                if name in params:
                    assert params[name].default == default, (cls.__name__, view, name)
        assert "k" not in cls.view_options and "row" not in cls.view_options  # one word: top_k, batch


def _define(**members):
    """Define a Result subclass with the given members (a valid one without arguments)."""
    body = {"to_dict": lambda self, *, batch=0: {}, "to_dataframe": lambda self: None,
            "table": lambda self, *, batch=0: None, "fragment": lambda self, *, batch=0: "",
            "_summary": lambda self: "", **members}
    return type("Custom", (mi_lenses.Result,), {k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize("members,message", [
    ({"fragment": None}, "Custom does not implement fragment()"),
    ({"_summary": None}, "Custom does not implement _summary()"),
    ({"table": lambda self, *, batch=0, k=15: None}, r"table\(\) takes k=, which Custom.view_options does not "
                                                       "declare"),
    ({"view_options": {"top_k": 10}, "table": lambda self, *, batch=0, top_k=15: None},
     r"table\(\) defaults top_k=15, but Custom.view_options declares top_k=10"),
    ({"view_options": {"top_k": 10}, "table": lambda self, *, batch=0, top_k: None},
     r"table\(\) takes top_k without a default"),
    ({"view_options": {"top_k": 10}}, "declares top_k, which no view takes"),
    ({"to_dict": lambda self, batch=0: {}}, r"to_dict\(\) must take batch=0 \(keyword-only\)"),
    ({"to_dict": lambda self, *, batch=0, **options: {}}, r"to_dict\(\) takes \*\*options"),
    ({"print": lambda self, *, batch=0, k=5: None}, r"overrides print\(\)"),
    ({"view_options": {"top_k": 10}, "table": lambda self, *, batch=0, top_k=10: None,
      "top": lambda self, k=10: []}, r"top\(\) must take top_k="),
    ({"view_options": {"batch": 0}}, "declares batch"),
])
def test_a_wrong_result_class_fails_when_it_is_defined(members, message):
    _define()  # the valid base case
    with pytest.raises(TypeError, match=message):
        _define(**members)


def test_a_result_subclass_keeps_its_own_repr_and_gets_the_one_line_one():
    @dataclasses.dataclass
    class Sized(_define()):
        n: int = 3

        def _summary(self) -> str:
            return f"of {self.n} things"

    assert repr(Sized()) == "<Sized of 3 things>"  # not the @dataclass repr of the fields


@pytest.mark.parametrize("kind", KINDS)
def test_every_declared_option_works_in_every_shared_view(results, kind, capsys):
    """``print``/``show``/``to_html``/``to_json`` accept every option the type declares (each view takes the ones
    that apply to it); an option it does not declare is a TypeError naming the declared ones."""
    res = results[kind]
    for name, default in res.view_options.items():
        res.print(width=200, **{name: default})
        assert res.show(**{name: default})._repr_html_()
        assert res.to_html(**{name: default}).startswith("<!DOCTYPE html>")
        assert res.to_json(**{name: default}) == res.to_json()  # the default, passed or not
    capsys.readouterr()
    with pytest.raises(TypeError, match=f"{kind} has no view option 'k'"):
        res.print(k=5)
    with pytest.raises(TypeError, match="has no view option 'row'"):
        res.to_json(row=0)


@pytest.mark.parametrize("kind,count", [
    ("DLAResult", lambda d: len(d["top_neurons"])),
    ("AttentionResult", lambda d: len(d["top_heads"]["sink"])),
    ("PatchingResult", lambda d: len(d["top"])),
    ("EdgeAttribution", lambda d: len(d["top_edges"])),
    ("NeuronAttribution", lambda d: len(d["top_neurons"])),
])
def test_top_k_is_the_number_of_items_listed(results, kind, count, capsys):
    res = results[kind]
    assert count(json.loads(res.to_json(top_k=3))) == 3 == count(res.to_dict(top_k=3))
    assert count(res.to_dict()) == min(res.view_options["top_k"], count(res.to_dict(top_k=10_000)))
    res.print(top_k=3, width=200)  # dla.print(top_k=5) raised a TypeError once (its table took k=)
    assert capsys.readouterr().out.strip()
    if hasattr(res, "top"):
        assert len(res.top(top_k=3)) == 3
        assert inspect.signature(type(res).top).parameters["top_k"].default == res.view_options["top_k"]


@pytest.mark.parametrize("kind", KINDS)
def test_repr_is_one_short_line(results, kind):
    text = repr(results[kind])
    assert text.startswith(f"<{kind} ") and text.endswith(">") and "\n" not in text
    assert "tensor(" not in text and len(text) < 300, text
    assert "tiny" in text  # the model's name


def test_lens_evaluation_table_is_rich_and_markdown_is_separate(results):
    from rich.table import Table

    ev = results["LensEvaluation"]
    assert isinstance(ev.table(), Table)
    md = ev.to_markdown()
    assert md.startswith("| layer |") and md.count("\n") == len(ev.layers) + 1


def test_cli_leaves_no_hooks_and_names_the_fix(builder, capsys):
    m = builder.get("llama_gqa", "raw").model
    before = hook_counts(m)
    from mi_lenses.cli import main

    assert main(["logit-lens", "x", "--model", "/no/such/model.gguf"]) == 2
    assert "not found" in capsys.readouterr().err
    assert hook_counts(m) == before
