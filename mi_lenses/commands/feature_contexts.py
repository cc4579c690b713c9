"""``mi-lenses feature-contexts --dictionary DIR``: each feature's max-activating contexts over a corpus (streamed),
its activation frequency and its feature logit lens: the data of a feature dashboard.

Example::

    mi-lenses feature-contexts --dictionary sae12 --features 123 456 --top-k 10 --html f.html --json f.json
    mi-lenses feature-contexts --dictionary sae12 --data corpus/ --max-tokens 262144 --lens smol_lens

The flags after ``--dictionary`` and ``--data`` (``--features``, ``--top-k``, ``--context``, ``--max-tokens``,
``--seq-len``, ``--batch-size``, ``--lens``, ``--no-progress``) are the fields of
:class:`~mi_lenses.features.options.FeatureContextsOptions`.
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, add_dataclass_options, dataclass_from_args, load, write_outputs
from mi_lenses.data import TRAIN_TEXT
from mi_lenses.features import load_dictionary
from mi_lenses.features.contexts import feature_contexts
from mi_lenses.features.options import FeatureContextsOptions
from mi_lenses.results import plural


def register(sub, parents: Parents) -> None:
    fc = sub.add_parser("feature-contexts", parents=[parents.model, parents.outputs],
                        help="max-activating contexts of a dictionary's features over a corpus")
    fc.add_argument("--dictionary", required=True,
                    help="dictionary folder (mi_lenses, SAELens, sparsify hook folder or circuit-tracer)")
    fc.add_argument("--data", default=str(TRAIN_TEXT),
                    help="the corpus: text file or folder, or a cached `datasets` name NAME[:CONFIG][@SPLIT] "
                         "(default: the public-domain text shipped with mi_lenses)")
    add_dataclass_options(fc, FeatureContextsOptions)
    fc.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    options = dataclass_from_args(FeatureContextsOptions, args).validate(flags=True)  # before loading the model
    dictionary = load_dictionary(args.dictionary)  # a bad folder is refused before the model loads
    t0 = time.perf_counter()
    model = load(args)
    t1 = time.perf_counter()
    res = feature_contexts(model, dictionary, args.data, options=options)
    t2 = time.perf_counter()
    res.print(top_k=options.top_k)
    print(f"model loaded in {t1 - t0:.1f} s, {plural(len(res.features), 'feature')} over "
          f"{plural(res.n_tokens, 'token')} in {t2 - t1:.1f} s.")
    write_outputs(args, res, top_k=options.top_k)
    return 0
