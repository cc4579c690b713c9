"""The attribute lens: linear relational embeddings (LRE, Hernandez et al. 2023, "Linearity of Relation Decoding in
Transformer Language Models") read at every layer and position.

For a relation given by a template with a subject slot (``"The capital of {} is"``) and a few subjects, the LM's
output state ``o`` (the final residual stream at the last token) is approximated to first order in the subject state
``s`` (row ``r``, the subject's last token):

    o ~ LRE(s) = beta * W s + b,    W = mean_i d o_i / d s_i,    b = mean_i (o_i - (d o_i / d s_i) s_i)

with the paper's scale ``beta`` on ``W`` (2.5 by default, as for GPT-J). The Jacobians are exact (one backward pass
per output dimension, :func:`~mi_lenses.lenses.jacobian.residual_jacobians`), one ``W, b`` per row. The attribute lens
decodes ``LRE(h)`` for any state ``h`` of that row at any position through the model's own final norm and unembedding:
which attribute of the relation the model holds for what it is reading, layer by layer.

**Faithfulness** (the paper's measure): on held-out subjects, the fraction whose LRE top-1 token, from the subject
state, equals the LM's own top-1 next token for the prompt; :func:`evaluate_attribute_lens` reports it per row.

Example:
    >>> subjects = ["France", "Paris", "Rome", "Berlin", "a city", "the fox", "a dog"]
    >>> lens = mi_lenses.fit_attribute_lens(model, "The capital of {} is", subjects, n_train=4, progress=False)
    >>> lens.meta["train_subjects"], len(lens.rows)
    (['France', 'Paris', 'Rome', 'Berlin'], 4)
    >>> ev = mi_lenses.evaluate_attribute_lens(lens, model, subjects[4:])
    >>> len(ev.faithfulness) == len(ev.layers), ev.n_subjects
    (True, 3)
    >>> res = lens(model, "I went to Rome")        # the usual LensResult, read through the relation
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from rich.table import Table
from torch import Tensor

from mi_lenses.errors import LensInputError
from mi_lenses.lenses.affine import RowMapLens
from mi_lenses.lenses.jacobian import residual_jacobians
from mi_lenses.models.identity import model_identity
from mi_lenses.models.view import ModelView
from mi_lenses.progress import track
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.more_lenses import relation_fragment


class AttributeLens(RowMapLens):
    """Per-row linear relational embeddings ``beta * W_r h + b_r`` of one relation (``meta["template"]``)."""

    name = "attribute lens"
    kind = "attribute"
    maps_final = True


def subject_prompt(view: ModelView, template: str, subject: str) -> tuple[Tensor, int]:
    """Tokens ``[1, S]`` of ``template`` with ``subject`` in its ``{}`` slot, and the position of the subject's last
    token (an error when the subject merges with the text after it into one token)."""
    if template.count("{}") != 1:
        raise LensInputError(f"the template needs exactly one '{{}}' where the subject goes, got {template!r}.")
    if not isinstance(subject, str) or not subject:
        raise LensInputError(f"subjects must be non-empty strings, got {subject!r}.")
    head = template[: template.index("{}")]
    prompt = template.format(subject)
    tokens = view.to_tokens(prompt)
    prefix = view.to_tokens(head + subject)[0]
    n = prefix.shape[0]
    if n > tokens.shape[1] or not torch.equal(tokens[0, :n], prefix):
        raise LensInputError(f"the subject {subject!r} merges with the text after it in {prompt!r}: put a space or "
                             "punctuation after the '{}' in the template.")
    return tokens, n - 1


def _sample(s: Any) -> tuple[str, str | None]:
    if isinstance(s, str):
        return s, None
    if isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(x, str) for x in s):
        return s[0], s[1]
    raise LensInputError(f"a sample is a subject string or a (subject, object) pair of strings, got {s!r}.")


def fit_attribute_lens(
    model: Any,
    template: str,
    samples: Sequence[str | tuple[str, str]],
    *,
    n_train: int = 8,
    beta: float = 2.5,
    rows: Sequence[int] | None = None,
    dim_batch: int = 8,
    progress: bool = True,
) -> AttributeLens:
    """Fit the LRE of a relation on the first ``n_train`` of ``samples`` (subjects, or ``(subject, object)`` pairs;
    objects are only used by :func:`evaluate_attribute_lens`), one ``W, b`` per row (0 = embeddings ...
    ``n_layers`` = final; default all). ``beta`` scales ``W`` when the lens is read (the paper's 2.5).

    Args:
        model: a TransformerLens model or a ``ModelView``.
        template: the relation's prompt with one ``{}`` where the subject goes (``"The capital of {} is"``); the
            subject's last token must stay a token of its own (put a space or punctuation after the ``{}``).
        samples: subject strings or ``(subject, object)`` pairs; the first ``n_train`` are fitted on.
        n_train: how many of ``samples`` the Jacobians are averaged over (default 8).
        beta: the scale on ``W`` when the lens is read, ``beta * W h + b`` (stored in the lens as ``scale``).
        rows: the residual rows fitted (0 = embeddings .. ``n_layers`` = final, negative from the end); default all.
        dim_batch: output dimensions per backward pass of the Jacobian (``ceil(d_model / dim_batch)`` passes per
            subject; larger is faster and uses more memory).
        progress: show a progress bar over the subjects.

    Returns:
        :class:`AttributeLens`, with the template, ``beta`` and the training subjects in its ``meta``.
    """
    view = ModelView(model)
    pairs = [_sample(s) for s in samples]
    if not isinstance(n_train, int) or n_train < 1 or not pairs:
        raise LensInputError(f"need at least one sample and n_train >= 1, got {len(pairs)} samples, n_train={n_train!r}.")
    train = pairs[:n_train]
    L = view.n_layers
    rows = list(range(L + 1)) if rows is None else sorted({int(r) % (L + 1) for r in rows})
    W = {r: torch.zeros(view.d_model, view.d_model, dtype=torch.float64) for r in rows}
    b = {r: torch.zeros(view.d_model, dtype=torch.float64) for r in rows}

    for subject, _ in track(train, "fitting LRE", unit="subject", enabled=progress):
        tokens, s_pos = subject_prompt(view, template, subject)
        S = tokens.shape[1]
        jac, states, final = residual_jacobians(view, tokens, rows, sources=[s_pos], targets=[S - 1],
                                                dim_batch=dim_batch)
        for r in rows:
            W[r] += jac[r]
            b[r] += final[0].double() - jac[r] @ states[r][0].double()
    n = len(train)
    meta = {**model_identity(view), "template": template, "beta": float(beta),
            "train_subjects": [s for s, _ in train], "train_objects": [o for _, o in train]}
    return AttributeLens({r: (W[r] / n).float() for r in rows}, {r: (b[r] / n).float() for r in rows},
                         n_layers=L, d_model=view.d_model, scale=beta, meta=meta)


@dataclass
class RelationEvaluation(Result):
    """Faithfulness of an attribute lens on held-out subjects, per row.

    ``lm_top1[i]``: the LM's own next token for subject ``i``; ``lre_top1[r][i]``: the LRE's top-1 from the subject
    state of row ``r``; ``faithfulness[r]``: the fraction where they agree; ``accuracy[r]``: the fraction where the
    LRE's top-1 is the first token of the given object (None without objects).
    """

    model_name: str
    template: str
    layers: list[str]
    subjects: list[str]
    objects: list[str | None]
    lm_top1: list[str]
    lre_top1: list[list[str]]
    faithfulness: list[float]
    accuracy: list[float | None]
    lm_accuracy: float | None
    beta: float
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_subjects(self) -> int:
        return len(self.subjects)

    @property
    def title(self) -> str:
        return f"Attribute lens faithfulness: {self.model_name}"

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """``{"template", "beta", "layers", "faithfulness"[layer], "accuracy"[layer], "lm_accuracy", "subjects",
        "objects", "lm_top1", "lre_top1"[layer][subject]}``."""
        self.check_batch(batch)
        return jsonable({"model": self.model_name, "template": self.template, "beta": self.beta,
                         "layers": self.layers, "faithfulness": self.faithfulness, "accuracy": self.accuracy,
                         "lm_accuracy": self.lm_accuracy, "subjects": self.subjects, "objects": self.objects,
                         "lm_top1": self.lm_top1, "lre_top1": self.lre_top1})

    def to_dataframe(self):
        return dataframe([{"layer": lab, "layer_index": r, "subject": s, "object": self.objects[i],
                              "lm_top1": self.lm_top1[i], "lre_top1": self.lre_top1[r][i],
                              "faithful": self.lre_top1[r][i] == self.lm_top1[i]}
                          for r, lab in enumerate(self.layers) for i, s in enumerate(self.subjects)])

    def table(self, *, batch: int = 0):

        self.check_batch(batch)
        t = Table(title=f"{self.template!r} · beta {self.beta:g} · {self.n_subjects} held-out subjects",
                  caption=None if self.lm_accuracy is None else f"LM accuracy on the objects: {self.lm_accuracy:.2f}")
        t.add_column("layer", style="bold")
        t.add_column("faithfulness", justify="right")
        t.add_column("accuracy", justify="right")
        for r, lab in enumerate(self.layers):
            acc = self.accuracy[r]
            t.add_row(lab, f"{self.faithfulness[r]:.2f}", "-" if acc is None else f"{acc:.2f}")
        return t

    def fragment(self, *, batch: int = 0) -> str:
        self.check_batch(batch)
        return relation_fragment(self)

    def _summary(self) -> str:
        best = max(range(len(self.layers)), key=lambda r: self.faithfulness[r]) if self.layers else None
        top = "" if best is None else f", best faithfulness {self.faithfulness[best]:.2f} at {self.layers[best]}"
        return (f"{self.template!r} on {self.model_name!r}: {plural(self.n_subjects, 'held-out subject')} x "
                f"{plural(len(self.layers), 'row')}, beta {self.beta:g}{top}")


def evaluate_attribute_lens(lens: AttributeLens, model: Any, samples: Sequence[str | tuple[str, str]]) -> \
        RelationEvaluation:
    """Faithfulness (and accuracy, given objects) of ``lens`` on held-out ``samples``, per fitted row.

    Args:
        lens: an :class:`AttributeLens` from :func:`fit_attribute_lens` (its ``meta["template"]`` builds the prompts).
        model: the model it was fitted on (a TransformerLens model or a ``ModelView``).
        samples: held-out subject strings or ``(subject, object)`` pairs; accuracy is reported only when every
            sample has an object (its first token is compared).

    Returns:
        :class:`RelationEvaluation`: per row, the fraction of subjects whose LRE top-1 equals the LM's own top-1
        (``faithfulness``) and, with objects, equals the object's first token (``accuracy``).
    """
    view = ModelView(model)
    if not isinstance(lens, AttributeLens):
        raise LensInputError(f"expected an AttributeLens (mi_lenses.fit_attribute_lens), got {type(lens).__name__}.")
    lens = lens.bind(view.model)
    template = lens.meta.get("template")
    pairs = [_sample(s) for s in samples]
    if not pairs:
        raise LensInputError("pass at least one held-out subject.")
    rows = sorted(lens.W)
    all_rows = view.residual_rows("resid_pre")
    names = {r: all_rows[r].hook_name for r in rows}
    lm_top1, lre_top1 = [], {r: [] for r in rows}
    obj_ids: list[int | None] = []
    for subject, obj in pairs:
        tokens, s_pos = subject_prompt(view, template, subject)
        logits, cache = view.run_with_cache(view.batch(tokens), set(names.values()))
        lm_top1.append(int(logits[0, -1].argmax()))
        for r in rows:
            h = lens.apply(cache[names[r]][0, s_pos].float()[None], r)
            lre_top1[r].append(int(view.decode(h)[0].argmax()))
        obj_ids.append(None if obj is None else int(view.model.to_tokens(obj, prepend_bos=False)[0, 0]))
    has_obj = all(o is not None for o in obj_ids)
    n = len(pairs)
    return RelationEvaluation(
        model_name=view.name, template=template, layers=[all_rows[r].label for r in rows],
        subjects=[s for s, _ in pairs], objects=[o for _, o in pairs],
        lm_top1=[view.id_to_str(i) for i in lm_top1],
        lre_top1=[[view.id_to_str(i) for i in lre_top1[r]] for r in rows],
        faithfulness=[sum(a == c for a, c in zip(lre_top1[r], lm_top1)) / n for r in rows],
        accuracy=[sum(a == o for a, o in zip(lre_top1[r], obj_ids)) / n if has_obj else None for r in rows],
        lm_accuracy=sum(a == o for a, o in zip(lm_top1, obj_ids)) / n if has_obj else None,
        beta=lens.scale,
    )
