"""Regenerate the gallery (docs/report.md, the README's tour): the report of one prompt on the embedded SmolLM2,
opened in headless Chromium, and a screenshot of the page and of each view, plus the terminal summary as SVG. Run
``bash scripts/screenshots.sh``.

Everything runs offline. The tuned lens shown beside the logit lens is fitted here by the least-squares warm start
alone (``--lens-tokens`` tokens of WikiText-2 when ``../shared/data`` is there, else of the text shipped with mi_lenses),
unless ``--lens DIR`` names a trained one.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "When Mary and John went to the store, John gave a drink to"
VIEWS = {  # file -> (CSS selector on the report page, most pixels high)
    "report_lens.png": ("#lens-grids", 1100),
    "report_curves.png": ("#lens-curves", 1100),
    "report_patchscope.png": ("#patchscope", 1300),
    "report_dla.png": ("#dla", 1500),
    "attention_diagnostics.png": ("#attention-diagnostics", 1200),
    "head_view.png": ("#head-view", 1300),
    "model_view.png": ("#model-view", 1600),
    "neuron_view.png": ("#neuron-view", 1200),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for the images (default docs/)")
    ap.add_argument("--lens", default=None, help="a trained tuned-lens folder to show (default: a warm start)")
    ap.add_argument("--lens-tokens", type=int, default=4096, help="tokens of the warm-start lens (default 4096)")
    ap.add_argument("--width", type=int, default=1280, help="browser width in pixels (default 1280)")
    args = ap.parse_args()

    import torch

    import mi_lenses
    from browser import Browser, find_chromium
    from rich.console import Console

    exe = find_chromium()
    if exe is None:
        print("Chromium is not installed: apt-get install -y chromium", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = mi_lenses.load_model()
    lens = args.lens
    if lens is None:
        shared = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"  # optional, where it exists
        data = shared if shared.is_file() else Path(mi_lenses.data.TRAIN_TEXT)
        t = time.perf_counter()
        lens = mi_lenses.train_lens(model, data, steps=0, warm_start_tokens=args.lens_tokens, progress=False)
        print(f"warm-start lens on {args.lens_tokens} tokens of {data.name} in {time.perf_counter() - t:.0f} s")
    for attempt in range(3):  # the terminal summary shows the timings: keep a run the other jobs left alone
        wall, cpu = time.perf_counter(), time.process_time()
        rep = mi_lenses.report(model, PROMPT, lens=lens, answer=" Mary", wrong=" John", progress=attempt == 0)
        utilisation = (time.process_time() - cpu) / (time.perf_counter() - wall) / torch.get_num_threads()
        if utilisation >= 0.8:
            break
    else:
        print(f"warning: CPU utilisation {utilisation:.2f} during the report (other jobs?): the timings in "
              "docs/terminal.svg are not the machine's", file=sys.stderr)
    page = out / ".report.tmp.html"  # ignored by git (*.html); removed below
    rep.to_html(page)
    console = Console(record=True, width=120)
    console.print(rep.table())
    (out / "terminal.svg").write_text(console.export_svg(title="mi-lenses report"))
    try:
        with Browser(exe, width=args.width, height=1000) as b:
            shown = b.open(page)
            if shown.console_errors or shown.network_requests:
                print(f"the page is not clean: {shown.console_errors} {shown.network_requests}", file=sys.stderr)
                return 1
            b.screenshot(out / "report.png")  # what a reader sees first
            for name, (selector, height) in VIEWS.items():
                b.screenshot(out / name, selector=selector, max_height=height)
    finally:
        page.unlink(missing_ok=True)
    for f in ["report.png", *VIEWS, "terminal.svg"]:
        print(f"wrote {out / f} ({(out / f).stat().st_size / 1024:.0f} KiB)")
    print(f"report computed in {rep.seconds['total']:.1f} s at CPU utilisation {utilisation:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
