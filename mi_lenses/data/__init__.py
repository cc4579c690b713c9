"""Text for fitting and evaluating lenses: the public-domain text shipped with mi_lenses (see ``README.md`` in this
folder; the defaults of the commands, the tests, the tutorials and the benchmarks, so nothing outside the repository
is needed) and :func:`load_tokens`, which packs any text source into token sequences.

Example:
    >>> TRAIN_TEXT.name, EVAL_TEXT.name
    ('shakespeare_train.txt', 'shakespeare_eval.txt')
    >>> TRAIN_TEXT.stat().st_size > 200_000 and EVAL_TEXT.stat().st_size > 50_000
    True
"""

from pathlib import Path

from mi_lenses.data.tokens import load_tokens, pack, sample_from_model

DATA_DIR = Path(__file__).resolve().parent
TRAIN_TEXT = DATA_DIR / "shakespeare_train.txt"  # 240 kB: training a tuned lens, fitting maps
EVAL_TEXT = DATA_DIR / "shakespeare_eval.txt"  # 60 kB, disjoint: held-out evaluation

__all__ = ["DATA_DIR", "EVAL_TEXT", "TRAIN_TEXT", "load_tokens", "pack", "sample_from_model"]
