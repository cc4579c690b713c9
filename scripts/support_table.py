"""Run the architecture matrix and write docs/architectures.md (the support table) from what it measured.

    .venv/bin/python scripts/support_table.py          # 30-60 s on 2 cores; exits 1 (and writes nothing) when a
                                                       # cell differs from the expectation table in tests/arch_matrix.py

Every cell is run as tests/test_architectures.py runs it; the page is rendered from the outcomes, with the
TransformerLens, transformers and torch versions it ran on. tests/test_architectures.py keeps the committed page's
table equal to the expectation table.
"""

from __future__ import annotations

import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

import arch_matrix as AM  # noqa: E402
from archs import SPECS  # noqa: E402
from tiny import _train_tokenizer  # noqa: E402


def versions() -> str:
    return (f"Run on TransformerLens {version('transformer-lens')}, transformers {version('transformers')}, "
            f"torch {version('torch')}.")


def main() -> int:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        matrix = AM.Matrix(_train_tokenizer(Path(tmp) / "tok"), Path(tmp))
        got, bad = {}, []
        for name in SPECS:
            for mode in AM.MODES:
                for feature in AM.FEATURES:
                    want = AM.expected(name, mode, feature)
                    if want.startswith("probe: ") and not AM.PARITY_PROBE:
                        got[(name, mode, feature)] = want  # not run: the parity probe's cells (see EXPECT_PROBE)
                        continue
                    try:
                        out = AM.outcome(matrix, name, mode, feature)
                    except Exception as err:  # a wrong number or a crash: reported, the page is not written
                        out = f"FAIL: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
                    got[(name, mode, feature)] = out
                    if out != want:
                        bad.append(f"{name} {mode} {feature}: {out} (expected {want})")
            print(f"{name:22s} done", flush=True)
    if bad:
        print("\n".join(["cells that differ from the expectation table:", *bad]), file=sys.stderr)
        return 1
    page = ROOT / "docs" / "architectures.md"
    page.write_text(AM.render_page(got, versions()), encoding="utf-8")
    print(f"wrote {page.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
