"""What is patched and how the patches are laid out: a ``Site`` is one activation family (``what``) read per layer,
cut into grid cells (``by``).

``what`` names a TransformerLens hook per layer, and each hook's tensor has named axes after the batch:

================  =================================  =======================================  ==================
``what``          hook (block ``l``)                 axes after the batch                     default ``by``
================  =================================  =======================================  ==================
``resid_pre``     ``blocks.l.hook_resid_pre``        ``pos, d``                               ``layer_pos``
``resid_mid``     ``blocks.l.hook_resid_mid``        ``pos, d``                               ``layer_pos``
``resid_post``    ``blocks.l.hook_resid_post``       ``pos, d``                               ``layer_pos``
``attn_out``      ``blocks.l.hook_attn_out``         ``pos, d``                               ``layer_pos``
``mlp_out``       ``blocks.l.hook_mlp_out``          ``pos, d``                               ``layer_pos``
``head_out``      ``blocks.l.attn.hook_z``           ``pos, head, d``                         ``layer_head``
``head_q``        ``blocks.l.attn.hook_q``           ``pos, head, d``                         ``layer_head``
``head_k``        ``blocks.l.attn.hook_k``           ``pos, head, d`` (key/value heads)       ``layer_head``
``head_v``        ``blocks.l.attn.hook_v``           ``pos, head, d`` (key/value heads)       ``layer_head``
``head_pattern``  ``blocks.l.attn.hook_pattern``     ``head, pos, src`` (pos = destination)   ``layer_head``
``neurons``       ``blocks.l.mlp.hook_post``         ``pos, neuron``                          ``layer_neuron``
``features``      the ``dictionary``'s hooks         ``pos, feature``                         ``layer_feature``
================  =================================  =======================================  ==================

``features`` are a dictionary's feature activations (``dictionary=``: an SAE or a transcoder on one hook, whose block
is the grid's one layer; or a :class:`~mi_lenses.features.dictionary.DictionarySet` with one dictionary per block,
whose blocks are the grid's layers, ``layers=`` choosing among them): a patch replaces the base run's activations of
the cell's features by the source run's and keeps the base run's reconstruction error
(:mod:`~mi_lenses.patching.features`). A block's dictionary is the one whose output hook (``writes``) is in it.

``by`` picks the grid axes after the layer: ``layer_pos``, ``layer_head``, ``layer_pos_head``, ``layer`` (the whole
activation of a layer), ``layer_neuron``, ``layer_pos_neuron``, ``layer_feature``, ``layer_pos_feature``. An axis that is not a grid axis is patched whole (every
position, every head...). The grid is ``[layers, *grid axes]``: ``layer_pos`` gives ``[L, P]``, ``layer_pos_head``
``[L, P, H]`` (TransformerLens's ``get_act_patch_attn_head_pattern_by_pos`` orders it ``[L, H, P]``).

``resid_mid`` is patched in the residual stream itself: on a ``TransformerBridge`` the hook ``hook_resid_mid`` is the
MLP's input (``ln2.hook_in``), so writing it would change what the MLP reads but not the stream that skips the MLP
(TransformerLens 4.3's own ``get_act_patch_resid_mid`` does that); the patch is written as the difference added to
``hook_attn_out`` at the same positions instead (``resid_mid = resid_pre + attn_out``), which is what a
``HookedTransformer``'s ``hook_resid_mid`` does in both worlds. :meth:`Site.write_hook` names where a patch is written.

Positions are the aligned pairs of the position map (``(clean position, corrupted position)``; identity when both
prompts have the same length): the grid's ``P`` runs over them, and a patch copies the source run's activation at its
position into the base run's at its own. :meth:`Site.index` builds the indexing tuple of a set of cells for either
run, so that one assignment ``base[index(..., "base")] = source[index(..., "source")]`` patches many rows at once.

Example:
    >>> site = resolve_site(ModelView(model), "head_out", None, sizes={"pos": 6, "head": 6, "d": 8})
    >>> site.by, site.grid_shape, site.hook(1)
    ('layer_head', (3, 6), 'blocks.1.attn.hook_z')
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence, get_args

import torch
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.features.dictionary import Dictionary, DictionarySet, hook_layer
from mi_lenses.indexing import IndexSpec, resolve_indices
from mi_lenses.models.view import ModelView

What = Literal["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out", "head_q", "head_k",
               "head_v", "head_pattern", "neurons", "features"]
By = Literal["layer_pos", "layer_head", "layer_pos_head", "layer", "layer_neuron", "layer_pos_neuron", "layer_feature",
             "layer_pos_feature"]

WHATS: tuple[str, ...] = get_args(What)
BYS: tuple[str, ...] = get_args(By)
AXES: dict[str, tuple[str, ...]] = {
    **{w: ("pos", "d") for w in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")},
    **{w: ("pos", "head", "d") for w in ("head_out", "head_q", "head_k", "head_v")},
    "head_pattern": ("head", "pos", "src"),
    "neurons": ("pos", "neuron"),
    "features": ("pos", "feature"),
}
GRID_AXES: dict[str, tuple[str, ...]] = {
    "layer_pos": ("pos",), "layer_head": ("head",), "layer_pos_head": ("pos", "head"), "layer": (),
    "layer_neuron": ("neuron",), "layer_pos_neuron": ("pos", "neuron"), "layer_feature": ("feature",),
    "layer_pos_feature": ("pos", "feature")}
DEFAULT_BY = {**{w: "layer_pos" for w in WHATS}, **{w: "layer_head" for w in WHATS if w.startswith("head_")},
              "neurons": "layer_neuron", "features": "layer_feature"}


def hook_of(view: ModelView, what: str, layer: int) -> str:
    """The hook name of ``what`` in block ``layer``."""
    if what.startswith("resid_"):
        return view.hook_name(what, layer)
    if what in ("attn_out", "mlp_out"):
        return view.out_hook(layer, what[:-4])
    if what == "neurons":
        return view.mlp_hook(layer, "post")
    return view.attn_hook(layer, {"head_out": "z", "head_q": "q", "head_k": "k", "head_v": "v",
                                  "head_pattern": "pattern"}[what])


@dataclass(frozen=True)
class Site:
    """One activation family cut into cells (see the module docstring). ``sizes`` maps every axis to its length in
    the base run (``pos``: the number of aligned positions; ``feature``: the most features of any layer's dictionary),
    ``pos_map`` the aligned ``(source, base)`` positions; features: ``dictionary`` is what the caller passed (a
    dictionary or a set), ``members`` the dictionary patched in each of ``layers``."""

    view: ModelView = field(repr=False)
    what: str
    by: str
    layers: list[int]
    sizes: dict[str, int]
    pos_map: list[tuple[int, int]] = field(default_factory=list)
    identity_map: bool = True
    dictionary: Any = field(default=None, repr=False)
    members: dict[int, Dictionary] = field(default_factory=dict, repr=False)

    @property
    def axes(self) -> tuple[str, ...]:
        return AXES[self.what]

    @property
    def grid_axes(self) -> tuple[str, ...]:
        return GRID_AXES[self.by]

    @property
    def grid_shape(self) -> tuple[int, ...]:
        return (len(self.layers), *(self.sizes[a] for a in self.grid_axes))

    def hook(self, layer: int) -> str:
        """Where the activation is read (cached) in block ``layer`` (features: the dictionary's input)."""
        if self.what == "features":
            return self.members[layer].hook
        return hook_of(self.view, self.what, layer)

    @property
    def additive(self) -> bool:
        """Whether a patch is written as ``source - base`` added at :meth:`write_hook` (``resid_mid``)."""
        return self.what == "resid_mid"

    def write_hook(self, layer: int) -> str:
        """Where a patch is written in block ``layer``: the read hook, ``hook_attn_out`` for ``resid_mid``, the
        dictionary's output hook for features."""
        if self.what == "features":
            return self.members[layer].writes
        return self.view.out_hook(layer, "attn") if self.additive else self.hook(layer)

    def layer_site(self, layer: int) -> "Site":
        """A features site cut down to block ``layer``: its one dictionary, with that dictionary's own number of
        features (what patching that dictionary alone resolves to)."""
        d = self.members[layer]
        return replace(self, layers=[layer], sizes=dict(self.sizes, feature=d.n_features), dictionary=d,
                       members={layer: d})

    def cells_per_layer(self) -> int:
        n = 1
        for a in self.grid_axes:
            n *= self.sizes[a]
        return n

    def coords(self) -> dict[str, Tensor]:
        """The grid coordinates of every cell of one layer, flattened in grid order (the last axis fastest)."""
        ranges = [torch.arange(self.sizes[a]) for a in self.grid_axes]
        if not ranges:
            return {}
        mesh = torch.meshgrid(*ranges, indexing="ij")
        return {a: m.flatten() for a, m in zip(self.grid_axes, mesh)}

    def index(self, rows: Tensor, coords: dict[str, Tensor], side: Literal["base", "source"]) -> tuple:
        """The indexing tuple of the cells ``coords`` (one per row of ``rows``, the batch index in the tensor being
        indexed) for the ``"base"`` or the ``"source"`` run: grid axes take each row's coordinate, the other axes are
        patched whole (positions through the position map). ``t[index]`` has shape ``[n, ...]``."""
        which = 1 if side == "base" else 0
        positions = torch.tensor([p[which] for p in self.pos_map], dtype=torch.long)
        whole_pos = "pos" in self.axes and "pos" not in self.grid_axes and not self.identity_map
        lead = (slice(None), None) if whole_pos else (slice(None),)
        out: list = [rows[lead]]
        for axis in self.axes:
            if axis in self.grid_axes:
                c = coords[axis]
                out.append((positions[c] if axis == "pos" else c)[lead])
            elif axis == "pos" and whole_pos:
                out.append(positions[None, :])
            else:
                out.append(slice(None))
        return tuple(out)


def check_head_split(view: ModelView, analysis: str) -> None:
    """Refuse per-head ``hook_z`` / ``q`` / ``k`` / ``v`` work on multi-head latent attention: TransformerLens splits
    those hooks by ``cfg.d_head`` while each value head is wider (and fires q/k/v head-first), so patching head ``h``
    there would write another head's slice."""
    mla = [l for l in range(view.n_layers) if view.is_mla(l)]
    if mla:
        raise LensInputError(
            f"{analysis} patches single heads' hook_z/q/k/v, but blocks {mla[:4]}{'...' if len(mla) > 4 else ''} run "
            "multi-head latent attention, whose heads TransformerLens does not split into those hooks one to one: "
            "patch what='attn_out', 'resid_pre', 'mlp_out' or 'head_pattern' instead, or use "
            "mi_lenses.direct_logit_attribution for per-head effects.")


def resolve_site(view: ModelView, what: str, by: str | None, *, sizes: dict[str, int], layers: IndexSpec = None,
                 pos_map: Sequence[tuple[int, int]] | None = None, dictionary: Any = None) -> Site:
    """The :class:`Site` of ``what`` cut by ``by`` (default per ``what``), checked: ``by`` must use axes ``what`` has,
    the model must have the hook (no ``resid_mid`` on parallel blocks, no MLP hooks on attention-only models)."""
    if what not in WHATS:
        raise LensInputError(f"unknown what={what!r}; use one of {list(WHATS)}.")
    by = DEFAULT_BY[what] if by is None else by
    if by not in BYS:
        raise LensInputError(f"unknown by={by!r}; use one of {list(BYS)}.")
    missing = [a for a in GRID_AXES[by] if a not in AXES[what]]
    if missing:
        fits = [b for b in BYS if all(a in AXES[what] for a in GRID_AXES[b])]
        raise LensInputError(f"what={what!r} has no {missing[0]} axis, so by={by!r} does not apply: use one of {fits}.")
    if what == "resid_mid" and getattr(view.cfg, "parallel_attn_mlp", False):
        raise LensInputError("this model runs attention and MLP in parallel: its blocks have no resid_mid. Use "
                             "what='resid_pre' or 'resid_post'.")
    if what in ("mlp_out", "neurons") and not view.has_mlp:
        raise LensInputError(f"this model has no MLPs, so what={what!r} does not exist.")
    if what in ("head_out", "head_q", "head_k", "head_v"):
        check_head_split(view, f"what={what!r}")
    if (what == "features") != (dictionary is not None):
        raise LensInputError("what='features' patches a dictionary's features: pass dictionary= (an SAE, a "
                             "transcoder, or a DictionarySet of one per block), and only with what='features'.")
    members: dict[int, Dictionary] = {}
    if what == "features":
        members = dictionary_blocks(dictionary)
        if isinstance(dictionary, Dictionary):
            (layer,) = members
            if layers is not None and resolve_indices(layers, view.n_layers, "layer") != [layer]:
                raise LensInputError(f"the dictionary sits in block {layer}: layers= can only be {layer} (or None).")
            layers = [layer]
        elif layers is None:
            layers = sorted(members)
        else:
            asked = resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks")
            missing = [l for l in asked if l not in members]
            if missing:
                raise LensInputError(f"the dictionary set has no dictionary in block{'s' if len(missing) > 1 else ''} "
                                     f"{', '.join(map(str, missing))}: layers= can be any of {sorted(members)} (or "
                                     "None for all of them).")
        members = {l: members[l] for l in sorted(resolve_indices(layers, view.n_layers, "layer"))}
        sizes = dict(sizes, feature=max(d.n_features for d in members.values()))
    chosen = resolve_indices(layers, view.n_layers, "layer", f"this model has {view.n_layers} blocks")
    n = sizes.get("pos", 0)
    pairs = [(p, p) for p in range(n)] if pos_map is None else [tuple(p) for p in pos_map]
    identity = all(a == b for a, b in pairs) and len(pairs) == n
    return Site(view, what, by, chosen, dict(sizes, pos=len(pairs)), pairs, identity, dictionary, members)


def dictionary_blocks(dictionary: Dictionary | DictionarySet) -> dict[int, Dictionary]:
    """``{block: dictionary}`` of what ``what="features"`` patches: a dictionary's block is the one its output hook
    (``writes``) is in. Refused: a dictionary writing outside the blocks, a cross-layer transcoder (its features also
    write into later blocks), two members of a set in one block (the grid has one dictionary per layer)."""
    if isinstance(dictionary, DictionarySet) and dictionary.cross:
        raise LensInputError(
            "this is a cross-layer transcoder: a feature of block i also writes into every later block's output "
            "through the cross decoders, which feature patching (one write per block) does not carry, so it is "
            "refused. Use mi_lenses.feature_dla(model, prompt, clt) for the features' direct effects, or patch "
            "clt.dictionaries[i] alone: layer i's encoder and its own decoder, the cross decoders dropped (not the "
            "transcoder's replacement of the MLPs).")
    ds = [dictionary] if isinstance(dictionary, Dictionary) else list(dictionary.dictionaries)
    out: dict[int, Dictionary] = {}
    for i, d in enumerate(ds):
        layer = hook_layer(d.writes)
        name = "the dictionary" if len(ds) == 1 else f"dictionary {i} of the set"
        if layer is None:
            raise LensInputError(f"{name} writes {d.writes!r}, outside the blocks: feature patching needs a "
                                 "dictionary inside a block.")
        if layer in out:
            same = [j for j, e in enumerate(ds) if hook_layer(e.writes) == layer]
            raise LensInputError(
                f"the dictionary set has {len(same)} dictionaries writing into block {layer} "
                f"({', '.join(repr(ds[j].writes) for j in same)}): a feature-patching grid has one dictionary per "
                f"layer. Patch them one call at a time, dictionary=dictionary_set.dictionaries[i] for i in {same}, "
                "or build a DictionarySet with one dictionary per block.")
        out[layer] = d
    return out
