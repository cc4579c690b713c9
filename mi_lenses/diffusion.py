"""The Diffusion Lens (Toker et al. 2024, "Diffusion Lens: Interpreting Text Encoders in Text-to-Image Pipelines"):
what a text-to-image model's text encoder has built by each of its layers, shown as images.

For layer ``l`` of the CLIP text encoder, the hidden states ``h_l`` of the prompt go through the encoder's own final
layer norm and replace the prompt embeddings that condition the diffusion model's cross-attention; every layer is
generated with the same seed, so the images differ only through the encoder layer. The last layer is the pipeline's
own prompt embedding (tested), and layer ``l`` is what diffusers computes for ``clip_skip = n_layers - l`` (tested
where that works: diffusers 0.42's ``clip_skip`` reads ``text_encoder.text_model.final_layer_norm``, which a
transformers 5 ``CLIPTextModel`` no longer has; we find the norm either way).

It runs on any local Stable-Diffusion-style folder (``StableDiffusionPipeline`` layout: ``text_encoder``,
``tokenizer``, ``unet``, ``vae``, ``scheduler``), loaded offline with :func:`load_pipeline`; it needs the optional
extra ``pip install mi-lenses[diffusion]`` (``diffusers``). Pipelines with two text encoders (SDXL) are refused.

Example (a real pipeline, minutes per layer on a CPU)::

    pipe = mi_lenses.diffusion.load_pipeline("path/to/stable-diffusion-v1-5")
    res = mi_lenses.diffusion.diffusion_lens(pipe, "a red cube on a blue sphere", layers=[2, 6, 9, 12],
                                             num_images=2, num_inference_steps=25)
    res.save_gallery("gallery")        # PNG per (layer, image) and an offline index.html
    res.to_html("lens.html"); res.print()
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.table import Table
from torch import Tensor

from mi_lenses.atomic import write_files_atomic
from mi_lenses.errors import LensInputError, ModelLoadError
from mi_lenses.indexing import IndexSpec, resolve_indices
from mi_lenses.results import Result, dataframe, jsonable, plural
from mi_lenses.viz.more_lenses import diffusion_fragment

EXTRA = "pip install 'mi-lenses[diffusion]'"


def _diffusers() -> Any:
    try:
        import diffusers  # deferred: the optional [diffusion] extra
    except ImportError as err:
        raise LensInputError(f"the Diffusion Lens needs the `diffusers` package: {EXTRA}.") from err
    return diffusers


def load_pipeline(folder: str | os.PathLike, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A Stable-Diffusion-style pipeline from a local folder (never the hub), safety checker off, progress bars
    off."""
    diffusers = _diffusers()
    path = Path(folder).expanduser()
    if not (path / "model_index.json").is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json): pass the folder that "
                             "pipeline.save_pretrained() wrote.")
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path), local_files_only=True, torch_dtype=dtype,
                                                           safety_checker=None, requires_safety_checker=False)
    except Exception as err:  # noqa: BLE001 - any loader failure is a load error naming the folder
        raise ModelLoadError(f"could not load the pipeline in {path}: {type(err).__name__}: {err}") from err
    check_pipeline(pipe)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def check_pipeline(pipe: Any) -> None:
    """Refuse pipelines the lens cannot read: it needs one CLIP-style text encoder with a final layer norm."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        raise LensInputError("this pipeline has two text encoders (SDXL-style); the Diffusion Lens here reads "
                             "single-encoder Stable-Diffusion pipelines (StableDiffusionPipeline layout).")
    enc = getattr(pipe, "text_encoder", None)
    if enc is None or getattr(pipe, "tokenizer", None) is None:
        raise LensInputError("the pipeline has no text_encoder/tokenizer: pass a Stable-Diffusion-style pipeline.")
    final_norm(enc)


def final_norm(encoder: Any) -> Any:
    """The text encoder's final layer norm (``final_layer_norm`` of a CLIP text model; transformers 4 nests it under
    ``text_model``)."""
    for owner in (encoder, getattr(encoder, "text_model", None)):
        norm = getattr(owner, "final_layer_norm", None)
        if norm is not None:
            return norm
    raise LensInputError(f"the text encoder {type(encoder).__name__} has no final_layer_norm (CLIP layout): the "
                         "Diffusion Lens cannot apply the encoder's final norm to its layers.")


def n_text_layers(pipe: Any) -> int:
    return int(pipe.text_encoder.config.num_hidden_layers)


@torch.no_grad()
def layer_prompt_embeds(pipe: Any, prompt: str | Sequence[str], layers: Sequence[int]) -> dict[int, Tensor]:
    """``{l: final_layer_norm(h_l)}`` ``[batch, seq, d]`` for text-encoder layers ``l`` (0 = token + position
    embeddings, ``n`` = the last layer, whose value is the pipeline's own prompt embedding), tokenised as the
    pipeline does (padded to the tokenizer's maximum length, truncated)."""
    check_pipeline(pipe)
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise LensInputError("prompt must be a string or a list of strings.")
    tok, enc = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(enc.device)
    mask = None
    if getattr(enc.config, "use_attention_mask", False):
        mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").attention_mask.to(enc.device)
    hidden = enc(ids, attention_mask=mask, output_hidden_states=True).hidden_states
    norm = final_norm(enc)
    return {int(l): norm(hidden[l]).to(enc.dtype) for l in layers}


@dataclass
class DiffusionLensResult(Result):
    """Images ``images[i][j]`` (PIL) generated from text-encoder layer ``layers[i]``, image ``j`` (seed
    ``seeds[j]``): the same seeds for every layer."""

    prompt: str
    layers: list[int]
    n_layers: int
    seeds: list[int]
    images: list[list[Any]] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)
    files: list[list[str]] | None = None

    @property
    def title(self) -> str:
        return f"Diffusion Lens: {self.prompt}"

    def _stats(self, img: Any) -> dict[str, float]:

        a = np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0
        return {"mean": float(a.mean()), "std": float(a.std())}

    def to_dict(self, *, batch: int = 0) -> dict[str, Any]:
        """``{"prompt", "layers", "n_layers", "seeds", "settings", "size", "files", "pixel_stats"[layer][image]}``."""
        self.check_batch(batch)
        return jsonable({"prompt": self.prompt, "layers": self.layers, "n_layers": self.n_layers, "seeds": self.seeds,
                         "settings": self.settings, "size": list(self.images[0][0].size), "files": self.files,
                         "pixel_stats": [[self._stats(im) for im in row] for row in self.images]})

    def to_dataframe(self):
        return dataframe([{"layer": l, "image": j, "seed": self.seeds[j], **self._stats(im),
                              "file": None if self.files is None else self.files[i][j]}
                          for i, l in enumerate(self.layers) for j, im in enumerate(self.images[i])])

    def table(self, *, batch: int = 0):

        self.check_batch(batch)
        t = Table(title=f"Diffusion Lens · {self.prompt!r} · {len(self.seeds)} image(s) per layer")
        t.add_column("layer", justify="right", style="bold")
        t.add_column("images (mean / std of pixels)")
        for i, l in enumerate(self.layers):
            stats = [self._stats(im) for im in self.images[i]]
            t.add_row(f"{l}/{self.n_layers}", "  ".join(f"{s['mean']:.3f}/{s['std']:.3f}" for s in stats))
        return t

    def fragment(self, *, batch: int = 0) -> str:
        """The gallery: one row per layer, one column per seed, images inlined (offline)."""
        self.check_batch(batch)
        return diffusion_fragment(self)

    def _summary(self) -> str:
        size = "x".join(map(str, self.images[0][0].size)) if self.images and self.images[0] else "?"
        return (f"of {self.prompt!r} on {self.settings.get('pipeline', '?')!r}: {len(self.layers)} of "
                f"{self.n_layers} text-encoder layers x {plural(len(self.seeds), 'seed')}, {size} pixels")

    def save_gallery(self, folder: str | os.PathLike) -> Path:
        """Write ``layer{l:02d}_seed{s}.png`` per image and an offline ``index.html`` into ``folder``, atomically
        (the page last)."""
        writers, files = [], []
        for i, l in enumerate(self.layers):
            files.append([])
            for j, im in enumerate(self.images[i]):
                name = f"layer{l:02d}_seed{self.seeds[j]}.png"
                files[-1].append(name)
                writers.append((name, lambda tmp, im=im: im.save(tmp, format="PNG")))
        self.files = files
        writers.append(("index.html", lambda tmp: tmp.write_text(self.to_html(), encoding="utf-8")))
        return write_files_atomic(folder, writers)


def diffusion_lens(
    pipeline: Any,
    prompt: str,
    *,
    layers: IndexSpec = None,
    num_images: int = 1,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
) -> DiffusionLensResult:
    """Generate ``num_images`` images (seeds ``seed, seed + 1, ...``) from each text-encoder layer in ``layers``
    (0 .. n_layers, negative from the end; default all) of ``pipeline`` (see the module docstring). The unconditional
    branch of classifier-free guidance is the pipeline's own (the empty prompt through the full encoder).

    Args:
        pipeline: a single-text-encoder Stable-Diffusion-style diffusers pipeline (e.g. from :func:`load_pipeline`).
        prompt: the text prompt, a non-empty string.
        layers: text-encoder layers (0 = token + position embeddings .. ``n_layers`` = the last layer, the
            pipeline's own prompt embedding; negative from the end); default all.
        num_images: images per layer, one per seed.
        seed: the first seed (CPU generator); image ``j`` of every layer uses ``seed + j``.
        num_inference_steps, guidance_scale, height, width: the pipeline's own settings (``None`` height and width:
            the pipeline's default size).

    Returns:
        :class:`DiffusionLensResult`: ``images[i][j]`` from layer ``layers[i]`` and seed ``seeds[j]``.
    """
    check_pipeline(pipeline)
    if not isinstance(prompt, str) or not prompt:
        raise LensInputError("prompt must be a non-empty string.")
    n = n_text_layers(pipeline)
    chosen = resolve_indices(layers, n + 1, "text-encoder layer", f"the text encoder has layers 0..{n}")
    if not isinstance(num_images, int) or num_images < 1:
        raise LensInputError(f"num_images must be an int >= 1, got {num_images!r}.")
    if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise LensInputError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}.")
    embeds = layer_prompt_embeds(pipeline, prompt, chosen)
    seeds = [seed + j for j in range(num_images)]
    images = []
    for l in chosen:
        row = []
        for s in seeds:
            g = torch.Generator(device="cpu").manual_seed(s)
            out = pipeline(prompt_embeds=embeds[l], num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, height=height, width=width, generator=g, output_type="pil")
            row.append(out.images[0])
        images.append(row)
    settings = {"steps": num_inference_steps, "guidance_scale": guidance_scale, "height": height, "width": width,
                "pipeline": type(pipeline).__name__}
    return DiffusionLensResult(prompt, chosen, n, seeds, images, settings)
