"""Dictionary files: read SAELens, EleutherAI sparsify, circuit-tracer and our own folders; write ours and SAELens's.

Every format is a folder of ``safetensors`` files and a JSON or YAML config (never a pickle):

==================  =====================================================================================
ours                ``mi_dictionary.json`` (format ``mi_lenses.dictionary``, every field of the
                    :class:`~mi_lenses.features.dictionary.Dictionary`, the model's identity when saved with one,
                    the sha256 of the weights) + ``dictionary.safetensors`` (``W_enc`` ``[d_in, n]``, ...; a set:
                    ``{i}.W_enc``, ..., ``cross.{i}.{j}``)
SAELens (v6)        ``cfg.json`` (``architecture``: standard, jumprelu, topk, transcoder, skip_transcoder,
                    jumprelu_transcoder, jumprelu_skip_transcoder; ``d_in``, ``d_sae``, ``apply_b_dec_to_input``,
                    ``normalize_activations``, ``k``, ``rescale_acts_by_decoder_norm``, ``metadata.hook_name``
                    (and ``hook_name_out``); configs before 6.0: ``hook_name``/``hook_point`` at the top) +
                    ``sae_weights.safetensors`` (``W_enc`` ``[d_in, d_sae]``, ``b_enc``, ``W_dec`` ``[d_sae, d_out]``,
                    ``b_dec``, ``threshold``, ``W_skip`` ``[d_out, d_in]``)
a set               a folder of dictionary folders, one dictionary per block (a sparsify run's ``layers.N.mlp``
                    folders): read as a ``DictionarySet`` in layer order
sparsify            one hook folder named by its Hugging Face module (``layers.12``, ``layers.12.mlp``):
                    ``cfg.json`` (``d_in``, ``k``, ``num_latents``, ``transcode``, ``skip_connection``,
                    ``activation``) + ``sae.safetensors`` (``encoder.weight`` ``[n, d_in]``, ``encoder.bias``,
                    ``W_dec`` ``[n, d_in]``, ``b_dec``, ``W_skip``)
circuit-tracer      ``config.yaml`` (``model_kind``: ``transcoder_set`` or ``cross_layer_transcoder``,
                    ``feature_input_hook``, ``feature_output_hook``, ``model_name``) and per layer
                    ``layer_{i}.safetensors`` (``W_enc``/``W_dec`` ``[n, d]``, ``b_enc``, ``b_dec``, ``W_skip``,
                    ``activation_function.threshold``; GemmaScope 2: ``w_enc`` ``[d, n]``, ``w_dec``,
                    ``threshold``, ``affine_skip_connection``) or, cross-layer, ``W_enc_{i}.safetensors``
                    (``W_enc_{i}`` ``[n, d]``, ``b_enc_{i}``, ``b_dec_{i}``, ``threshold_{i}``) and
                    ``W_dec_{i}.safetensors`` (``W_dec_{i}`` ``[n, n_layers - i, d]``)
==================  =====================================================================================

Hooks are TransformerLens names. sparsify names Hugging Face modules: ``layers.N`` is ``blocks.N.hook_resid_post``,
a transcoder ``layers.N.mlp`` reads ``blocks.N.mlp.hook_in`` and writes ``blocks.N.mlp.hook_out``, an SAE on
``layers.N.mlp`` / ``layers.N.self_attn`` reads ``blocks.N.mlp.hook_out`` / ``blocks.N.attn.hook_out``.

Example:
    >>> g = torch.Generator().manual_seed(0)
    >>> d = Dictionary(torch.randn(8, 16, generator=g), torch.zeros(16), torch.randn(16, 8, generator=g),
    ...                torch.zeros(8), hook="blocks.0.hook_resid_post", activation="jumprelu",
    ...                threshold=torch.full((16,), 0.1))
    >>> _ = save(d, tmp / "ours"); _ = save(d, tmp / "saelens", format="saelens")
    >>> sorted(p.name for p in (tmp / "saelens").iterdir()), detect(tmp / "saelens")
    (['cfg.json', 'sae_weights.safetensors'], 'saelens')
    >>> back = load(tmp / "saelens")
    >>> back.activation, back.hook, bool(torch.equal(back.threshold, d.threshold))
    ('jumprelu', 'blocks.0.hook_resid_post', True)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet
from mi_lenses.features.processing import RAW, saelens_processing
from mi_lenses.models.identity import IDENTITY_KEYS, file_sha256

DictionaryFormat = Literal["mi_lenses", "saelens"]
FORMATS = ("mi_lenses", "saelens", "sparsify", "circuit-tracer", "set")
OURS, OURS_WEIGHTS, FORMAT_ID, VERSION = "mi_dictionary.json", "dictionary.safetensors", "mi_lenses.dictionary", 1
SAELENS_CFG, SAELENS_WEIGHTS, SAELENS_VERSION = "cfg.json", "sae_weights.safetensors", "6.54.12"
SPARSIFY_CFG, SPARSIFY_WEIGHTS = "cfg.json", "sae.safetensors"
CT_CONFIG = "config.yaml"
FIELDS = ("hook", "hook_out", "activation", "k", "apply_b_dec_to_input", "normalize_activations",
          "rescale_acts_by_decoder_norm")
TENSORS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip")
SAELENS_ARCHS = {  # (activation, transcoder, skip) -> SAELens architecture
    ("relu", False, False): "standard", ("jumprelu", False, False): "jumprelu", ("topk", False, False): "topk",
    ("relu", True, False): "transcoder", ("relu", True, True): "skip_transcoder",
    ("jumprelu", True, False): "jumprelu_transcoder", ("jumprelu", True, True): "jumprelu_skip_transcoder",
}
SAELENS_IDENTITY_NORMS = ("none", "expected_average_only_in", "covariance_whitening")  # identity at inference


# ---------------------------------------------------------------------------------------------- detect
def detect(path: str | os.PathLike) -> str:
    """The format of a dictionary folder (one of ``FORMATS``), or a ``LensInputError`` naming what was expected."""
    path = Path(path)
    if not path.is_dir():
        raise LensInputError(f"{path} is not a folder: pass the dictionary's folder (SAELens, sparsify hook folder, "
                             "circuit-tracer or mi_lenses).")
    names = {p.name for p in path.iterdir()}
    if OURS in names:
        return "mi_lenses"
    if SAELENS_WEIGHTS in names:
        return "saelens"
    if SPARSIFY_WEIGHTS in names:
        return "sparsify"
    if CT_CONFIG in names or "layer_0.safetensors" in names or "W_enc_0.safetensors" in names:
        return "circuit-tracer"
    if _member_folders(path):
        return "set"
    pickled = sorted(n for n in names if n.endswith((".pt", ".pth", ".bin", ".pkl", ".npz")))
    why = f" ({', '.join(pickled)}: mi_lenses reads safetensors only, never pickles)" if pickled else ""
    raise LensInputError(
        f"{path} holds no dictionary{why}: expected {OURS} + {OURS_WEIGHTS} (mi_lenses), {SAELENS_CFG} + "
        f"{SAELENS_WEIGHTS} (SAELens), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (a sparsify hook folder such as "
        f"layers.12.mlp) or {CT_CONFIG} + layer_*.safetensors / W_enc_*.safetensors (circuit-tracer).")


def load(path: str | os.PathLike) -> Dictionary | DictionarySet:
    """The dictionary in a folder of any format (see the module docstring)."""
    path = Path(path)
    return {"mi_lenses": _load_ours, "saelens": _load_saelens, "sparsify": _load_sparsify,
            "circuit-tracer": _load_circuit_tracer, "set": _load_set}[detect(path)](path)


def _member_folders(path: Path) -> list[Path]:
    """Subfolders that each hold one dictionary's files (a sparsify run's ``layers.N.mlp`` folders, SAELens or our
    folders side by side)."""
    marks = (OURS, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS)
    return sorted(p for p in path.iterdir() if p.is_dir() and any((p / m).is_file() for m in marks))


def _load_set(path: Path) -> DictionarySet:
    """A folder of one-dictionary folders as a :class:`DictionarySet`, in layer order (one dictionary per layer)."""
    items = [load(p) for p in _member_folders(path)]
    if not all(isinstance(d, Dictionary) and d.layer is not None for d in items):
        raise LensInputError(f"{path} holds folders that are not single dictionaries on a block: load them one by "
                             "one with mi_lenses.load_dictionary(folder).")
    items.sort(key=lambda d: d.layer)
    layers = [d.layer for d in items]
    if len(set(layers)) != len(layers):
        raise LensInputError(f"{path} holds two dictionaries on one block ({layers}): keep one folder per block.")
    return DictionarySet(items, {}, {"format": items[0].meta.get("format", "?"), "folder": str(path)})


def save(dictionary: Dictionary | DictionarySet, path: str | os.PathLike, *, format: DictionaryFormat = "mi_lenses",
         meta: dict[str, Any] | None = None) -> Path:
    """Write ``dictionary`` into the folder ``path`` (atomically, the config last) in our format or SAELens's;
    ``meta`` is added to ours (e.g. the model's identity)."""
    if format == "mi_lenses":
        return _save_ours(dictionary, Path(path), meta or {})
    if format == "saelens":
        if not isinstance(dictionary, Dictionary):
            raise LensInputError("SAELens stores one dictionary per folder: save each of the set's dictionaries "
                                 "(set.dictionaries[i]) into its own folder, or use format='mi_lenses'.")
        return _save_saelens(dictionary, Path(path), meta or {})
    raise LensInputError(f"unknown dictionary format {format!r}: mi_lenses writes 'mi_lenses' and 'saelens' "
                         f"(and reads {', '.join(FORMATS)}).")


# ---------------------------------------------------------------------------------------------- helpers
def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LensInputError(f"{path} is not valid JSON ({err}): the dictionary config is corrupt.") from err
    if not isinstance(data, dict):
        raise LensInputError(f"{path} is not a JSON object: the dictionary config is corrupt.")
    return data


def _tensors(path: Path, sha256: str | None = None) -> dict[str, Tensor]:
    if not path.is_file():
        raise LensInputError(f"{path} is missing: the dictionary folder is incomplete.")
    if sha256 and file_sha256(path) != sha256:
        raise LensInputError(f"{path} does not match the checksum in its config: the file is corrupt or was edited.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise LensInputError(f"cannot read {path} ({err}): the file is corrupt or truncated.") from err


def _need(tensors: dict[str, Tensor], key: str, where: Path) -> Tensor:
    if key not in tensors:
        raise LensInputError(f"{where} has no tensor {key!r} (it has {sorted(tensors)}): not a dictionary of this "
                             "format, or corrupt.")
    return tensors[key]


def _built(where: Path, **kwargs: Any) -> Dictionary:
    try:
        return Dictionary(**kwargs)
    except LensInputError as err:
        raise LensInputError(f"{where}: {err}") from None


# ---------------------------------------------------------------------------------------------- ours
def _record(d: Dictionary) -> dict[str, Any]:
    return {name: getattr(d, name) for name in FIELDS}


def _save_ours(dictionary: Dictionary | DictionarySet, path: Path, meta: dict[str, Any]) -> Path:
    items = [dictionary] if isinstance(dictionary, Dictionary) else dictionary.dictionaries
    prefix = (lambda i: "") if isinstance(dictionary, Dictionary) else (lambda i: f"{i}.")
    tensors: dict[str, Tensor] = {}
    for i, d in enumerate(items):
        for name in TENSORS:
            t = getattr(d, name)
            if t is not None:
                tensors[prefix(i) + name] = t.detach().float().cpu().contiguous().clone()
    if isinstance(dictionary, DictionarySet):
        for (i, j), W in dictionary.cross.items():
            tensors[f"cross.{i}.{j}"] = W.detach().float().cpu().contiguous().clone()
    own_meta = {**(dictionary.meta if isinstance(dictionary, DictionarySet) else items[0].meta), **meta}
    identity = {k: own_meta.get(k) for k in IDENTITY_KEYS}
    rest = {k: v for k, v in own_meta.items() if k not in IDENTITY_KEYS and k != "format"}
    digest: dict[str, str] = {}

    def weights(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        digest["sha256"] = file_sha256(tmp)

    def config(tmp: Path) -> None:
        cfg = {"format": FORMAT_ID, "version": VERSION,
               "kind": "dictionary" if isinstance(dictionary, Dictionary) else "set",
               "dictionaries": [_record(d) for d in items], **identity, "sha256": digest["sha256"],
               "meta": {**rest, **({"source_format": own_meta["format"]} if own_meta.get("format") else {})}}
        tmp.write_text(json.dumps(cfg, indent=1, default=str))

    return write_files_atomic(path, [(OURS_WEIGHTS, weights), (OURS, config)])


def _load_ours(path: Path) -> Dictionary | DictionarySet:
    cfg = _json(path / OURS)
    if cfg.get("format") != FORMAT_ID:
        raise LensInputError(f"{path / OURS} is not a mi_lenses dictionary config (format {cfg.get('format')!r}).")
    if int(cfg.get("version", 0)) > VERSION:
        raise LensInputError(f"{path / OURS} has format version {cfg.get('version')}: upgrade mi_lenses to read it.")
    tensors = _tensors(path / OURS_WEIGHTS, cfg.get("sha256"))
    records = cfg.get("dictionaries")
    if not isinstance(records, list) or not records:
        raise LensInputError(f"{path / OURS} has no 'dictionaries': the config is corrupt.")
    meta = {**(cfg.get("meta") or {}), **{k: cfg.get(k) for k in IDENTITY_KEYS if cfg.get(k) is not None},
            "format": "mi_lenses"}
    single = cfg.get("kind") == "dictionary"
    items = []
    for i, rec in enumerate(records):
        pre = "" if single else f"{i}."
        weights = {n: tensors.get(pre + n) for n in TENSORS}
        for n in ("W_enc", "b_enc", "W_dec", "b_dec"):
            _need(tensors, pre + n, path / OURS_WEIGHTS)
        items.append(_built(path, **weights, **{k: rec.get(k) for k in FIELDS if k in rec}, meta=dict(meta)))
    if single:
        return items[0]
    cross = {}
    for key, W in tensors.items():
        m = re.fullmatch(r"cross\.(\d+)\.(\d+)", key)
        if m:
            cross[(int(m.group(1)), int(m.group(2)))] = W
    return DictionarySet(items, cross, meta)


# ---------------------------------------------------------------------------------------------- SAELens
def _save_saelens(d: Dictionary, path: Path, meta: dict[str, Any]) -> Path:
    arch = SAELENS_ARCHS.get((d.activation, d.is_transcoder, d.W_skip is not None))
    threshold = d.threshold
    if d.activation == "batchtopk" and d.threshold is not None and not d.is_transcoder and d.W_skip is None:
        arch = "jumprelu"  # what SAELens saves a BatchTopK SAE as, for inference
        threshold = d.threshold.expand(d.n_features).clone()
    if arch is None:
        raise LensInputError(
            f"SAELens has no inference architecture for a {d.activation} {d.kind}"
            f"{' with a skip connection' if d.W_skip is not None else ''}: save it with format='mi_lenses'.")
    if d.is_transcoder and d.apply_b_dec_to_input:
        raise LensInputError("SAELens transcoders do not subtract b_dec from their input: save with "
                             "format='mi_lenses'.")
    tensors = {"W_enc": d.W_enc, "b_enc": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if threshold is not None and arch.startswith("jumprelu"):
        tensors["threshold"] = threshold
    if d.W_skip is not None:
        tensors["W_skip"] = d.W_skip
    tensors = {k: v.detach().float().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {"sae_lens_version": SAELENS_VERSION, "sae_lens_training_version": SAELENS_VERSION,
                "hook_name": d.hook, "model_name": meta.get("model_name", d.meta.get("model_name")),
                "hook_head_index": None, "prepend_bos": True}
    done = meta.get("processing", d.meta.get("processing"))
    if isinstance(done, dict):  # how the model was loaded, in HookedTransformer.from_pretrained's words
        metadata["model_from_pretrained_kwargs"] = {"fold_ln": bool(done.get("norm_folded")),
                                                    "center_writing_weights": bool(done.get("residual_centered")),
                                                    "fold_value_biases": bool(done.get("value_bias_folded"))}
    if d.is_transcoder:
        metadata.update({"hook_name_out": d.hook_out, "hook_head_index_out": None})
    cfg: dict[str, Any] = {"d_in": d.d_in, "d_sae": d.n_features, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": d.apply_b_dec_to_input,
                           "normalize_activations": d.normalize_activations,
                           "reshape_activations": "hook_z" if d.hook.endswith("hook_z") else "none",
                           "metadata": metadata, "architecture": arch}
    if arch == "topk":
        cfg.update({"k": int(d.k), "rescale_acts_by_decoder_norm": d.rescale_acts_by_decoder_norm})
    elif d.rescale_acts_by_decoder_norm:
        raise LensInputError("SAELens rescales activations by decoder norms only in topk SAEs: save with "
                             "format='mi_lenses'.")
    if d.is_transcoder:
        cfg["d_out"] = d.d_out

    def weights(tmp: Path) -> None:
        save_file(tensors, str(tmp))

    def config(tmp: Path) -> None:
        tmp.write_text(json.dumps(cfg))

    return write_files_atomic(path, [(SAELENS_WEIGHTS, weights), (SAELENS_CFG, config)])


def _saelens_processing(cfg: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """``{"processing": ...}`` from the file's ``model_from_pretrained_kwargs`` (v6 metadata or an older top-level
    key), or nothing when the file does not say how its model was loaded."""
    kwargs = meta.get("model_from_pretrained_kwargs", cfg.get("model_from_pretrained_kwargs"))
    done = saelens_processing(kwargs)
    return {} if done is None else {"processing": done}


def _load_saelens(path: Path) -> Dictionary:
    cfg = _json(path / SAELENS_CFG)
    meta = dict(cfg.get("metadata") or {})
    hook = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if not isinstance(hook, str):
        raise LensInputError(f"{path / SAELENS_CFG} names no hook (metadata.hook_name): the config is incomplete.")
    if (meta.get("hook_head_index") if "hook_head_index" in meta else cfg.get("hook_head_index")) is not None:
        raise LensInputError(f"{path}: an SAE on one attention head (hook_head_index) is not supported.")
    arch = cfg.get("architecture", "standard")
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    if (cfg.get("activation_fn") or cfg.get("activation_fn_str")) == "topk" and act_kwargs.get("k") is not None:
        arch, cfg = "topk", {**cfg, "k": act_kwargs["k"]}  # a config before SAELens 6
    supported = sorted(set(SAELENS_ARCHS.values()))
    if arch not in supported:
        raise LensInputError(f"{path}: SAELens architecture {arch!r} is not supported; mi_lenses reads "
                             f"{', '.join(supported)}.")
    norm = cfg.get("normalize_activations") or "none"
    if isinstance(norm, bool):
        norm = "expected_average_only_in" if norm else "none"
    if norm in SAELENS_IDENTITY_NORMS:
        norm = "none"  # SAELens folds these into the weights: the identity at inference, as SAELens runs them
    tensors = _tensors(path / SAELENS_WEIGHTS)
    scaling = tensors.get("scaling_factor")
    if scaling is not None and not torch.allclose(scaling, torch.ones_like(scaling)):
        raise LensInputError(f"{path}: a finetuning scaling_factor (SAELens before 6) is not supported.")
    transcoder = "transcoder" in arch
    hook_out = None
    if transcoder:
        hook_out = meta.get("hook_name_out") or cfg.get("hook_name_out")
        if hook_out is None:
            raise LensInputError(f"{path / SAELENS_CFG}: a transcoder without metadata.hook_name_out (the hook it "
                                 "writes): add it to the config.")
    activation = "jumprelu" if arch.startswith("jumprelu") else "topk" if arch == "topk" else "relu"
    return _built(
        path, W_enc=_need(tensors, "W_enc", path), b_enc=_need(tensors, "b_enc", path),
        W_dec=_need(tensors, "W_dec", path), b_dec=_need(tensors, "b_dec", path), hook=hook, hook_out=hook_out,
        activation=activation, threshold=tensors.get("threshold") if activation == "jumprelu" else None,
        k=int(cfg["k"]) if arch == "topk" else None,
        W_skip=tensors.get("W_skip") if "skip" in arch else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", not transcoder)) and not transcoder,
        normalize_activations=norm,
        rescale_acts_by_decoder_norm=bool(cfg.get("rescale_acts_by_decoder_norm", False)) and arch == "topk",
        meta={"format": "saelens", "architecture": arch, **meta, **_saelens_processing(cfg, meta)})


# ---------------------------------------------------------------------------------------------- sparsify
_HF_BLOCK = r"(?:model\.|transformer\.|gpt_neox\.|language_model\.)*(?:layers|h|blocks)\.(\d+)"


def sparsify_hooks(hookpoint: str, transcode: bool) -> tuple[str, str | None]:
    """The TransformerLens hooks of a sparsify hookpoint (a Hugging Face module name): ``(hook, hook_out)``."""
    m = re.fullmatch(_HF_BLOCK + r"(?:\.(mlp|feed_forward|self_attn|attn|attention))?", hookpoint)
    if m is None:
        raise LensInputError(f"sparsify hookpoint {hookpoint!r} is not a block ('layers.N') or its MLP / attention "
                             "('layers.N.mlp'): mi_lenses cannot tell which TransformerLens hook it is.")
    layer, module = int(m.group(1)), m.group(2)
    sub = None if module is None else "mlp" if module in ("mlp", "feed_forward") else "attn"
    if transcode:
        if sub is None:
            raise LensInputError(f"a sparsify transcoder on a whole block ({hookpoint!r}) is not supported: "
                                 "transcoders read a module's input and write its output (layers.N.mlp).")
        return f"blocks.{layer}.{sub}.hook_in", f"blocks.{layer}.{sub}.hook_out"
    return (f"blocks.{layer}.hook_resid_post" if sub is None else f"blocks.{layer}.{sub}.hook_out"), None


def _load_sparsify(path: Path) -> Dictionary:
    cfg = _json(path / SPARSIFY_CFG)
    if cfg.get("activation", "topk") != "topk":
        raise LensInputError(f"{path}: sparsify activation {cfg.get('activation')!r} is not supported (topk is).")
    transcode = bool(cfg.get("transcode", False))
    hook, hook_out = sparsify_hooks(path.name, transcode)
    tensors = _tensors(path / SPARSIFY_WEIGHTS)
    W = _need(tensors, "encoder.weight", path)
    return _built(
        path, W_enc=W.T, b_enc=_need(tensors, "encoder.bias", path), W_dec=_need(tensors, "W_dec", path),
        b_dec=_need(tensors, "b_dec", path), hook=hook, hook_out=hook_out, activation="topk", k=int(cfg.get("k", 32)),
        W_skip=tensors.get("W_skip") if cfg.get("skip_connection") else None, apply_b_dec_to_input=not transcode,
        meta={"format": "sparsify", "hookpoint": path.name, **cfg, "processing": dict(RAW)})


# ---------------------------------------------------------------------------------------------- circuit-tracer
def _load_circuit_tracer(path: Path) -> DictionarySet:
    cfg: dict[str, Any] = {}
    if (path / CT_CONFIG).is_file():
        try:
            cfg = yaml.safe_load((path / CT_CONFIG).read_text(encoding="utf-8")) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise LensInputError(f"{path / CT_CONFIG} is not valid YAML ({err}).") from err
    hook_in = str(cfg.get("feature_input_hook", "hook_resid_mid"))
    hook_out = str(cfg.get("feature_output_hook", "hook_mlp_out"))
    meta = {"format": "circuit-tracer", **{k: v for k, v in cfg.items() if isinstance(v, (str, int, float))},
            "processing": dict(RAW)}  # circuit-tracer loads its models unprocessed (fold_ln=False, no centring)
    cross_layer = cfg.get("model_kind") == "cross_layer_transcoder" or (path / "W_enc_0.safetensors").is_file()
    if cross_layer:
        return _load_clt(path, hook_in, hook_out, meta)
    files = cfg.get("transcoders")
    if files:
        paths = []
        for f in files:
            if str(f).startswith("hf://"):
                raise LensInputError(f"{path / CT_CONFIG} points at {f}: mi_lenses never downloads at run time; "
                                     "download the files and list their local paths.")
            p = Path(f)
            paths.append(p if p.is_absolute() else path / p)
    else:
        n = len(list(path.glob("layer_*.safetensors")))
        paths = [path / f"layer_{i}.safetensors" for i in range(n)]
    if not paths:
        raise LensInputError(f"{path} holds no layer_*.safetensors: not a circuit-tracer transcoder set.")
    items = []
    for i, p in enumerate(paths):
        t = _tensors(p)
        if "w_enc" in t:  # GemmaScope 2: w_enc [d, n], affine_skip_connection applied as x @ A
            W_enc, W_dec, threshold = t["w_enc"], _need(t, "w_dec", p), _need(t, "threshold", p)
            skip = t.get("affine_skip_connection")
            skip = None if skip is None else skip.T
        else:
            W_enc, W_dec = _need(t, "W_enc", p).T, _need(t, "W_dec", p)
            threshold, skip = t.get("activation_function.threshold"), t.get("W_skip")
        items.append(_built(p, W_enc=W_enc, b_enc=_need(t, "b_enc", p), W_dec=W_dec, b_dec=_need(t, "b_dec", p),
                            hook=f"blocks.{i}.{hook_in}", hook_out=f"blocks.{i}.{hook_out}",
                            activation="relu" if threshold is None else "jumprelu",
                            threshold=None if threshold is None else threshold.flatten(), W_skip=skip,
                            meta=dict(meta)))
    return DictionarySet(items, {}, meta)


def _load_clt(path: Path, hook_in: str, hook_out: str, meta: dict[str, Any]) -> DictionarySet:
    n = len(list(path.glob("W_enc_*.safetensors")))
    if n == 0:
        raise LensInputError(f"{path} holds no W_enc_*.safetensors: not a circuit-tracer cross-layer transcoder.")
    items, cross = [], {}
    for i in range(n):
        enc_path, dec_path = path / f"W_enc_{i}.safetensors", path / f"W_dec_{i}.safetensors"
        enc, dec = _tensors(enc_path), _tensors(dec_path)
        W_dec = _need(dec, f"W_dec_{i}", dec_path)
        if W_dec.ndim != 3 or W_dec.shape[1] != n - i:
            raise LensInputError(f"{dec_path}: W_dec_{i} has shape {tuple(W_dec.shape)}, expected [n_features, "
                                 f"{n - i}, d_model] (a decoder into this layer and every later one).")
        threshold = enc.get(f"threshold_{i}")
        items.append(_built(enc_path, W_enc=_need(enc, f"W_enc_{i}", enc_path).T,
                            b_enc=_need(enc, f"b_enc_{i}", enc_path), W_dec=W_dec[:, 0],
                            b_dec=_need(enc, f"b_dec_{i}", enc_path), hook=f"blocks.{i}.{hook_in}",
                            hook_out=f"blocks.{i}.{hook_out}", activation="relu" if threshold is None else "jumprelu",
                            threshold=None if threshold is None else threshold.flatten(), meta=dict(meta)))
        for j in range(i + 1, n):
            cross[(i, j)] = W_dec[:, j - i]
    return DictionarySet(items, cross, {**meta, "model_kind": "cross_layer_transcoder"})
