"""Target presets from the Patchscopes paper (Ghandeharioun et al. 2024) and related work.

Each function returns a :class:`~mi_lenses.patchscopes.spec.Target` (prompt, placeholder, suggested generation length);
change any field with ``.replace(layer=..., model=..., map=...)``. Placeholder positions follow the rule in
:mod:`mi_lenses.patchscopes.spec`: the token that ends the last occurrence (``occurrence="all"``: every occurrence).

Example:
    >>> sorted(PRESETS)
    ['attribute', 'description', 'future_lens', 'identity', 'identity_q', 'multi_hop', 'selfie']
    >>> selfie().occurrence, selfie().layer, identity().placeholder
    ('all', 2, '?')
"""

from __future__ import annotations

from mi_lenses.lenses.future_prompt import FUTURE_LENS_PROMPT
from mi_lenses.patchscopes.spec import IDENTITY_PROMPT, Target

DESCRIPTION_PROMPT = (
    "Syria: Country in the Middle East\n"
    "Leonardo DiCaprio: American actor\n"
    "Samsung: South Korean multinational major appliance and consumer electronics corporation\n"
    "x"
)
ATTRIBUTE_TEMPLATES = {
    "currency": "The official currency of x",
    "capital": "The capital city of x",
    "largest_city": "The largest city in x",
    "ceo": "The current CEO of x",
    "founder": "The founder of x",
}
# The seed's multi-hop example: "The current CEO of the company that created Visual Basic Script". The first hop
# ("the company that created Visual Basic Script" -> Microsoft) is read at its last token and patched into the second
# hop's placeholder, so the model answers "The current CEO of [Microsoft]".
MULTI_HOP_QUERY = "The current CEO of the company that created Visual Basic Script"
MULTI_HOP_FIRST_HOP = "The company that created Visual Basic Script"
MULTI_HOP_SECOND_HOP = "The current CEO of x"
SELFIE_PROMPT = "[INST] x x x x x [/INST] Sure, I will summarize the message:"


def identity() -> Target:
    """Token identity: ``"cat -> cat\\n1135 -> 1135\\nhello -> hello\\n?"``, patched at the final ``?``.

    The few-shot pattern asks the model to repeat whatever the patched state encodes; its next-token prediction
    is compared with the source model's own prediction (precision@1, surprisal): the paper's next-token Patchscope.
    """
    return Target(IDENTITY_PROMPT, placeholder="?", name="identity", max_new_tokens=8,
                  description="token identity: repeat what the patched state encodes")


def identity_q() -> Target:
    """Token identity with the plain ``"?"`` target prompt, patched at the ``?``: no few-shot context, so the readout
    carries no bias toward the few-shot pattern's ``" ->"`` (the ``patchscope-q`` lens of ``mi-lenses compare``)."""
    return Target("?", placeholder="?", name="identity_q", max_new_tokens=8,
                  description="token identity without few-shot context: the state at a lone '?'")


def description(prompt: str = DESCRIPTION_PROMPT, max_new_tokens: int = 20) -> Target:
    """Entity description: few-shot ``"name: description"`` lines ending in a placeholder ``x``; generate the
    description of the entity the patched state resolves to (the paper's entity-resolution experiment)."""
    return Target(prompt, placeholder="x", name="description", max_new_tokens=max_new_tokens,
                  description="few-shot 'name: description'; generates what the state is about")


def attribute(template: str = "currency", max_new_tokens: int = 6) -> Target:
    """Attribute extraction: ``"The official currency of x"`` (or a key of ``ATTRIBUTE_TEMPLATES``, or any template
    with a placeholder ``x``); the continuation names the attribute of the entity in the patched state."""
    prompt = ATTRIBUTE_TEMPLATES.get(template, template)
    return Target(prompt, placeholder="x", name=f"attribute:{template}", max_new_tokens=max_new_tokens,
                  description="attribute extraction: the continuation names an attribute of the patched entity")


def multi_hop(second_hop: str = MULTI_HOP_SECOND_HOP, max_new_tokens: int = 6) -> Target:
    """Multi-hop / chain-of-thought: the second hop with a placeholder for the first hop's answer.

    Use with ``Source(MULTI_HOP_FIRST_HOP, layers=l)`` (position -1): the state of "... Visual Basic Script" is patched
    where "x" stands in "The current CEO of x", so a correct first-hop state yields the CEO of Microsoft.
    """
    return Target(second_hop, placeholder="x", name="multi_hop", max_new_tokens=max_new_tokens,
                  description="chain of thought: first-hop state patched into the second hop")


def future_lens(n_ahead: int = 4, prompt: str = FUTURE_LENS_PROMPT) -> Target:
    """Future-Lens-style readout (Pal et al. 2023): patch into a generic, context-free prompt at its last token and
    generate ``n_ahead`` tokens; compare them with the source text's actual tokens ``i+1 .. i+n_ahead``."""
    return Target(prompt, placeholder=prompt[-1], name="future_lens", max_new_tokens=n_ahead,
                  description=f"Future Lens: decode {n_ahead} tokens ahead from one state")


def selfie(layer: int | None = 2, prompt: str = SELFIE_PROMPT, max_new_tokens: int = 20) -> Target:
    """SelfIE-style interpretation (Chen et al. 2024): the state is written at *every* placeholder ``x`` of an
    interpretation prompt, at a fixed early target layer (default 2), and the model summarises it."""
    return Target(prompt, placeholder="x", occurrence="all", layer=layer, name="selfie",
                  max_new_tokens=max_new_tokens, description="SelfIE: summarise the state written at every x")


PRESETS = {
    "identity": identity,
    "identity_q": identity_q,
    "description": description,
    "attribute": attribute,
    "multi_hop": multi_hop,
    "future_lens": future_lens,
    "selfie": selfie,
}
