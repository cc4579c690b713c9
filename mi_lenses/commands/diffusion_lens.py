"""``mi-lenses diffusion-lens``: images from every layer of a text-to-image model's text encoder (needs
``pip install 'mi-lenses[diffusion]'``).

Example::

    mi-lenses diffusion-lens --pipeline path/to/stable-diffusion-v1-5 --prompt "a red cube on a blue sphere" \\
        --layers 2,6,9,12 --images 2 --steps 25 --out gallery/ --html lens.html
"""

from __future__ import annotations

import argparse
import time

from mi_lenses.commands import Parents, add_output, write_outputs
from mi_lenses.diffusion import diffusion_lens, load_pipeline
from mi_lenses.errors import LensInputError


def register(sub, parents: Parents) -> None:
    p = sub.add_parser("diffusion-lens", parents=[parents.outputs],
                       help="Diffusion Lens: images generated from each text-encoder layer of a local SD pipeline")
    p.add_argument("--pipeline", required=True, help="local Stable-Diffusion-style pipeline folder (model_index.json)")
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--layers", default=None, help="text-encoder layers, comma list (default all; 0 = embeddings)")
    p.add_argument("--num-images", type=int, default=1, help="images per layer (seeds SEED, SEED+1, ...; default 1)")
    p.add_argument("--seed", type=int, default=0, help="first seed (default 0)")
    p.add_argument("--num-inference-steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    add_output(p, "--out", folder=True, default=None, help="write the gallery (PNGs + index.html) into this folder")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    layers = None
    if args.layers:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise LensInputError(f"--layers takes a comma list of ints, got {args.layers!r}.") from None
    t0 = time.perf_counter()
    pipe = load_pipeline(args.pipeline, device=args.device)
    res = diffusion_lens(pipe, args.prompt, layers=layers, num_images=args.num_images, seed=args.seed,
                         num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    if args.out:
        print(f"wrote {res.save_gallery(args.out)}")
    res.print()
    print(f"{len(res.layers)} layers x {len(res.seeds)} images in {time.perf_counter() - t0:.1f} s")
    write_outputs(args, res)
    return 0
