"""``mi-lenses report "PROMPT"``: every lens, the attribution and the attention of one prompt on one offline page,
and a summary in the terminal.

Example::

    mi-lenses report "The capital of France is" --out report.html
    mi-lenses report "When Mary and John went to the store, John gave a drink to" --answer " Mary" --wrong " John" \\
        --lens smol_lens --out ioi.html --json ioi.json
    mi-lenses report "A long prompt ..." --sections logit_lens,dla,attention    # skip the Patchscope
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, add_output, load, write_output, write_outputs
from mi_lenses.errors import LensInputError
from mi_lenses.features import load_dictionary
from mi_lenses.reports import SECTIONS, report


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("report", parents=[parents.model, parents.outputs],
                       help="one offline page: logit lens, tuned lens, Patchscope, DLA and attention of a prompt")
    p.add_argument("prompt", help="the prompt text")
    add_output(p, "--out", default="report.html", help="the page to write (default report.html; - for standard output)")
    p.add_argument("--lens", default=None, help="a tuned-lens folder (either format), shown beside the logit lens")
    p.add_argument("--answer", default=None,
                   help="the token attributed and tracked (exactly one token; default: the model's own prediction)")
    p.add_argument("--wrong", default=None, help="attribute logit[answer] - logit[wrong] instead")
    p.add_argument("--sections", default=None,
                   help=f"comma list of sections to compute (default: all): {','.join(SECTIONS)}")
    p.add_argument("--patchscope-positions", type=int, default=8,
                   help="the identity Patchscope runs at the prompt's last N positions (default 8)")
    p.add_argument("--top-k", type=int, default=5, help="tokens kept per layer and position (default 5)")
    p.add_argument("--corrupted", default=None,
                   help="a corrupted prompt of the same length: adds the patching section (exact resid_pre grid, "
                   "attribution of every head)")
    p.add_argument("--transcoders", default=None,
                   help="a transcoder folder, one per block: adds the graph section (the prompt's attribution graph)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sections = None
    if args.sections is not None:
        sections = [s.strip() for s in args.sections.split(",") if s.strip()]
        if not sections:
            raise LensInputError("--sections is empty: name some sections, or leave it out for all.")
    if not args.out:
        raise LensInputError("--out is empty: name the page to write, e.g. --out report.html.")
    transcoders = None if args.transcoders is None else load_dictionary(args.transcoders)  # before the model
    t0 = time.perf_counter()
    model = load(args)
    t1 = time.perf_counter()
    rep = report(model, args.prompt, lens=args.lens, answer=args.answer, wrong=args.wrong, sections=sections,
                 top_k=args.top_k, patchscope_positions=args.patchscope_positions, corrupted=args.corrupted,
                 transcoders=transcoders, beyond_context=args.beyond_context, progress=not args.no_progress)
    rep.print()
    print(f"model loaded in {t1 - t0:.1f} s, report in {rep.seconds['total']:.1f} s")
    write_output(args.out, rep.to_html)
    write_outputs(args, rep)
    return 0
