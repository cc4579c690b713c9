"""The public surface: one decode path, explicit typed signatures, one result protocol (checked when a result class
is defined), and every top-level name importable from ``mi_lenses``."""

from __future__ import annotations

import ast
import dataclasses
import gc
import importlib.util
import inspect
import json
import re
import sys
import typing
from pathlib import Path

import pytest
import torch
from tolerance import TIGHT

import mi_lenses
from conftest import PROMPT, PROMPTS, hook_counts
from mi_lenses.errors import VerificationError
from mi_lenses.models.decode import Decoder

PACKAGE = Path(mi_lenses.__file__).parent


# ------------------------------------------------------------------------------------------------ one decode path
def test_decoding_is_written_once():
    """No module but ``models/decode.py`` normalises with the final norm's statistics, applies the soft-cap or folds
    the unembedding: a lens, the statistics, training and DLA all go through the Decoder."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "decode.py" or path.relative_to(PACKAGE).as_posix() == "models/masks.py":
            continue  # (masks.py: the soft-cap of attention scores, not of logits)
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


# Derived from ``mi_lenses.__all__``: a public name is covered the day it is added.
PUBLIC = {name: getattr(mi_lenses, name) for name in mi_lenses.__all__}
PUBLIC_FUNCTIONS = sorted(name for name, obj in PUBLIC.items() if inspect.isfunction(obj))
PUBLIC_CLASSES = sorted(name for name, obj in PUBLIC.items() if inspect.isclass(obj))
VAR_KEYWORD_ALLOWED = {"train_lens": "overrides", "train_dictionary": "overrides"}  # TrainConfig's fields by name, checked against its fields


def test_the_public_api_is_all_of_it():
    """``__all__`` has no duplicates and holds every public function and class the package namespace
    imports from mi_lenses (the tests below are generated from it: a name missing there would go untested)."""
    assert len(mi_lenses.__all__) == len(set(mi_lenses.__all__))
    defined_here = {name for name, obj in vars(mi_lenses).items()
                    if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
                    and getattr(obj, "__module__", "").startswith("mi_lenses")}
    assert defined_here <= set(mi_lenses.__all__), sorted(defined_here - set(mi_lenses.__all__))
    assert {"activation_patching", "edge_attribution", "faithfulness", "path_patching"} <= set(PUBLIC_FUNCTIONS)
    assert {"PatchingResult", "EdgeAttribution", "Circuit"} <= set(PUBLIC_CLASSES)


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_no_kwargs_pass_through(name):
    params = inspect.signature(PUBLIC[name]).parameters.values()
    hidden = [p.name for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    assert hidden in ([], [VAR_KEYWORD_ALLOWED.get(name)]), f"{name} hides its options behind **{hidden[0]}"
    assert not [p for p in params if p.kind is inspect.Parameter.VAR_POSITIONAL], f"{name} takes *args"


def test_the_one_allowed_pass_through_is_checked():
    """``train_lens(..., **overrides)`` takes TrainConfig's fields by name and refuses any other name."""
    fields = {f.name for f in dataclasses.fields(mi_lenses.TrainConfig)}
    assert "steps" in fields
    with pytest.raises(mi_lenses.MiLensesError, match="no_such_option"):
        mi_lenses.train_lens(None, None, no_such_option=1)


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_are_annotated(name):
    sig = inspect.signature(PUBLIC[name])
    bare = [p.name for p in sig.parameters.values() if p.annotation is inspect.Parameter.empty]
    assert not bare, f"{name}: parameters without a type annotation: {bare}"
    assert sig.return_annotation is not inspect.Signature.empty, f"{name} has no return annotation"


@pytest.mark.parametrize("name", PUBLIC_FUNCTIONS)
def test_public_functions_document_every_argument(name):
    """A docstring with an ``Args:`` section that names every parameter (``**overrides`` aside). The lens options
    that ``with_lens_options`` adds are documented once, by ``LensOptions`` (and listed in ``run_lens``'s docstring):
    an entry point that takes them all may name ``LensOptions`` instead of each field."""
    from mi_lenses.lenses.options import FIELDS as LENS_OPTIONS

    doc = inspect.getdoc(PUBLIC[name]) or ""
    assert "Args:" in doc, f"{name}'s docstring has no Args: section"
    args = doc.split("Args:", 1)[1]
    params = [p.name for p in inspect.signature(PUBLIC[name]).parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD]
    if set(LENS_OPTIONS) <= set(params) and re.search(r"\bLensOptions\b", args):
        params = [p for p in params if p not in LENS_OPTIONS]
    missing = sorted(p for p in params if not re.search(rf"\b{p}\b", args))
    assert not missing, f"{name}'s Args: section does not name {missing}"


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


# every result class: the public ones and any other subclass of Result the package defines (the test below requires
# them to be the same), so a new result class gets every protocol test below the day it is added
RESULT_CLASSES = {c.__name__: c for c in _result_classes()} | {
    name: cls for name, cls in PUBLIC.items() if isinstance(cls, type) and issubclass(cls, mi_lenses.Result)
    and cls is not mi_lenses.Result}
KINDS = sorted(RESULT_CLASSES)


def test_every_result_class_is_public():
    walked = {c.__name__ for c in _result_classes()}
    public = {name for name, cls in PUBLIC.items() if isinstance(cls, type) and issubclass(cls, mi_lenses.Result)}
    assert walked == public - {"Result"}, (sorted(walked - public), sorted(public - walked - {"Result"}))
    assert {"PatchingResult", "EdgeAttribution", "Circuit", "NeuronAttribution", "DiffusionLensResult"} <= walked


@pytest.fixture(scope="module")
def results(builder, tmp_path_factory) -> dict[str, mi_lenses.Result]:
    """One instance of every result class, keyed by class name, on the tiny models (a few seconds)."""
    m = builder.get("llama_gqa", "raw").model
    tokens = torch.randint(3, m.cfg.d_vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    corrupted = PROMPT.replace("France", "Rome")
    edges = mi_lenses.edge_attribution(m, PROMPT, corrupted, answer=" city")
    graph = mi_lenses.attribution_graph(m, PROMPT, _tiny_transcoders(m), progress=False)
    built = {
        "LensResult": mi_lenses.logit_lens(m, PROMPTS, targets=" city"),
        "DLAResult": mi_lenses.direct_logit_attribution(m, PROMPTS, answer=" city"),
        "PatchscopeResult": mi_lenses.patchscope(m, mi_lenses.Source(PROMPT, [0, 2]),  # layers, positionally
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
        "FeatureResult": mi_lenses.features(m, PROMPTS, _tiny_dictionary(m)),
        "FeatureDLA": mi_lenses.feature_dla(m, PROMPTS, _tiny_dictionary(m), answer=" city"),
        "DictionaryEvaluation": mi_lenses.evaluate_dictionary(m, _tiny_dictionary(m), tokens, progress=False),
        "FeatureContexts": mi_lenses.feature_contexts(m, _tiny_dictionary(m), tokens, progress=False),
        "AttributionGraph": graph,
        "GraphIntervention": graph.intervene({graph.top_features(1)[0]: 0.0}),
    }
    if importlib.util.find_spec("diffusers") is not None:
        from tiny_diffusion import tiny_pipeline

        pipe = tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))
        built["DiffusionLensResult"] = mi_lenses.diffusion_lens(pipe, "a red cube", layers=[1, -1],
                                                                num_inference_steps=2)
    return built


def _tiny_dictionary(m) -> mi_lenses.Dictionary:
    """A random transcoder of block 1's MLP (the FeatureResult and FeatureDLA instances)."""
    g, D = torch.Generator().manual_seed(0), m.cfg.d_model
    return mi_lenses.Dictionary(torch.randn(D, 32, generator=g) * 0.4, torch.zeros(32), torch.randn(32, D, generator=g),
                                torch.zeros(D), hook="blocks.1.ln2.hook_normalized", hook_out="blocks.1.hook_mlp_out")


def _tiny_transcoders(m) -> mi_lenses.DictionarySet:
    """Random TopK transcoders on every block's MLP (the AttributionGraph instance)."""
    g, D = torch.Generator().manual_seed(0), m.cfg.d_model
    return mi_lenses.DictionarySet([
        mi_lenses.Dictionary(torch.randn(D, 32, generator=g) * 0.4, torch.zeros(32), torch.randn(32, D, generator=g),
                             torch.zeros(D), hook=f"blocks.{l}.mlp.hook_in", hook_out=f"blocks.{l}.mlp.hook_out",
                             activation="topk", k=4) for l in range(m.cfg.n_layers)])


def _instance(results: dict, kind: str) -> mi_lenses.Result:
    if kind == "DiffusionLensResult" and importlib.util.find_spec("diffusers") is None:
        pytest.skip("diffusers is not installed")
    if kind not in results:
        pytest.fail(f"{kind} has no instance in the results fixture of tests/test_api.py: add one, so every shared "
                    "view and option is run on it")
    res = results[kind]
    assert type(res) is RESULT_CLASSES[kind], (kind, type(res))
    return res


@pytest.mark.parametrize("kind", KINDS)
def test_every_result_class_has_a_fixture_instance(results, kind):
    _instance(results, kind)


# A value other than the default of every declared view option, by (class, option) or option name; ``Literal``
# options also run with every value their annotation allows.
OPTION_VALUES = {"top_k": 3, "max_positions": 3, "max_layers": 2, "max_keys": 4, "patterns": True, "query": 0,
                 "level": 3, ("PatchscopeResult", "layer"): 1, ("AttentionResult", "layer"): 1,
                 ("AttentionResult", "head"): 2, ("DLAResult", "head"): (1, 2), ("FeatureResult", "feature"): 3,
                 ("FeatureContexts", "feature"): "F3", "node_threshold": 0.5, "edge_threshold": 0.9}


def _option_values(cls: type, name: str) -> list:
    """The values the option is run with: the declared default, every ``Literal`` choice of the views that take it,
    and OPTION_VALUES's."""
    values = [cls.view_options[name]]
    for view, takes in cls._takes.items():
        if name in takes:
            hint = typing.get_type_hints(getattr(cls, view)).get(name)
            values += [v for v in typing.get_args(hint) if typing.get_origin(hint) is typing.Literal]
    for key in ((cls.__name__, name), name):
        if key in OPTION_VALUES:
            values.append(OPTION_VALUES[key])
            break
    return list(dict.fromkeys(values))


@pytest.mark.parametrize("kind", KINDS)
def test_every_declared_option_has_a_value_to_try(kind):
    cls = RESULT_CLASSES[kind]
    untried = [name for name in cls.view_options if len(_option_values(cls, name)) < 2]
    assert not untried, f"{kind}.view_options {untried}: add another value to OPTION_VALUES in tests/test_api.py"


@pytest.mark.parametrize("kind", KINDS)
def test_every_result_has_the_same_outputs(results, kind, tmp_path, capsys):
    res = _instance(results, kind)
    assert isinstance(res, mi_lenses.Result) and dataclasses.is_dataclass(res)
    page = res.to_html(tmp_path / "r.html")
    assert page == (tmp_path / "r.html").read_text() and page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(script|img|link|iframe)[^>]+(src|href)=[\"']?(https?:)?//", page, re.IGNORECASE), \
        "the page loads something from the network"
    assert "cdn.jsdelivr" not in page.lower() and "unpkg.com" not in page.lower()
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


def test_every_result_class_passes_the_definition_time_check():
    from mi_lenses.results import check_protocol

    classes = _result_classes()
    assert {c.__name__ for c in classes} == set(KINDS)
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
def test_every_declared_option_works_in_every_view(results, kind, capsys):
    """``print``/``show``/``to_html``/``to_json`` accept every option the type declares, with its default and with
    other values (each view takes the ones that apply to it), and so do ``to_dict``, ``to_dataframe``, ``table``,
    ``fragment`` and ``top`` where they take it; an option it does not declare is a TypeError naming the declared
    ones."""
    res = _instance(results, kind)
    cls = type(res)
    for name, default in res.view_options.items():
        for value in _option_values(cls, name):
            option = {name: value}
            res.print(width=200, **option)
            assert res.show(**option)._repr_html_()
            assert res.to_html(**option).startswith("<!DOCTYPE html>")
            text = res.to_json(**option)
            if name in res._takes["to_dict"]:
                assert json.loads(text) == res.to_dict(**option)
            if _same_value(value, default):
                assert text == res.to_json()  # the default, passed or not
            for view in ("to_dict", "table", "fragment"):
                if name in res._takes[view]:
                    assert getattr(res, view)(batch=0, **option) is not None, (view, option)
            if name in res._takes["to_dataframe"]:
                assert len(res.to_dataframe(**option)) > 0, option
            if name in res._takes.get("top", ()):
                assert isinstance(res.top(**option), list)
    capsys.readouterr()
    with pytest.raises(TypeError, match=f"{kind} has no view option 'k'"):
        res.print(k=5)
    with pytest.raises(TypeError, match="has no view option 'row'"):
        res.to_json(row=0)


def _same_value(a, b) -> bool:
    return type(a) is type(b) and a == b


# how many items the JSON of each result type lists under ``top_k`` (every type whose to_dict takes top_k is here)
TOP_K_COUNTS = {
    "DLAResult": lambda d: len(d["top_neurons"]),
    "AttentionResult": lambda d: len(d["top_heads"]["sink"]),
    "PatchingResult": lambda d: len(d["top"]),
    "EdgeAttribution": lambda d: len(d["top_edges"]),
    "NeuronAttribution": lambda d: len(d["top_neurons"]),
    "FeatureResult": lambda d: max(len(p["top"]) for p in d["positions"]),
    "FeatureDLA": lambda d: len(d["top_features"]),
    "FeatureContexts": lambda d: max(len(f["contexts"]) for f in d["features"]),
}


def test_every_top_k_count_is_tested():
    takes = {kind for kind, cls in RESULT_CLASSES.items() if "top_k" in cls._takes["to_dict"]}
    assert takes == set(TOP_K_COUNTS), sorted(takes ^ set(TOP_K_COUNTS))


@pytest.mark.parametrize("kind", sorted(TOP_K_COUNTS))
def test_top_k_is_the_number_of_items_listed(results, kind, capsys):
    res, count = _instance(results, kind), TOP_K_COUNTS[kind]
    assert count(json.loads(res.to_json(top_k=3))) == 3 == count(res.to_dict(top_k=3))
    assert count(res.to_dict()) == min(res.view_options["top_k"], count(res.to_dict(top_k=10_000)))
    res.print(top_k=3, width=200)  # dla.print(top_k=5) raised a TypeError once (its table took k=)
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("kind", [kind for kind in KINDS if "top" in RESULT_CLASSES[kind]._takes])
def test_top_returns_top_k_items_ranked(results, kind):
    res = _instance(results, kind)
    assert inspect.signature(type(res).top).parameters["top_k"].default == res.view_options["top_k"]
    everything = res.top(top_k=10_000)
    assert len(everything) > 3
    assert len(res.top(top_k=3)) == 3 and len(res.top()) == min(res.view_options["top_k"], len(everything))
    assert res.top(top_k=3) == everything[:3]
    sizes = [abs(value) for _, value in everything]
    assert sizes == sorted(sizes, reverse=True)  # ranked by |value| by default


@pytest.mark.parametrize("kind", KINDS)
def test_repr_is_one_short_line(results, kind):
    res = _instance(results, kind)
    text = repr(res)
    assert text.startswith(f"<{kind} ") and text.endswith(">") and "\n" not in text
    assert "tensor(" not in text and len(text) < 300, text
    # the model's name; a Diffusion Lens result names its pipeline (the tiny one is built in memory: its class)
    name = repr(res.settings["pipeline"]) if kind == "DiffusionLensResult" else "tiny"
    assert name in text, text


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
