"""The Diffusion Lens on a tiny randomly initialised Stable-Diffusion pipeline built here (nothing is downloaded):
the last layer is the pipeline's own prompt path, every layer equals an independent hook on the text encoder, the
same seed gives the same image, and pipelines load from a local folder only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import mi_lenses  # noqa: E402
from mi_lenses import diffusion  # noqa: E402
from mi_lenses.errors import LensInputError, ModelLoadError  # noqa: E402
from tiny_diffusion import tiny_pipeline  # noqa: E402
from tolerance import TIGHT  # noqa: E402

PROMPT = "a red cube on a blue sphere"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def _pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_last_layer_is_the_pipelines_own_prompt_path(pipe):
    n = diffusion.n_text_layers(pipe)
    emb = diffusion.layer_prompt_embeds(pipe, PROMPT, [n])[n]
    with torch.no_grad():
        own = pipe.encode_prompt(PROMPT, "cpu", 1, False)[0]
    assert torch.equal(emb, own)
    res = diffusion.diffusion_lens(pipe, PROMPT, layers=[-1], num_images=2, seed=5, num_inference_steps=3)
    for j, s in enumerate(res.seeds):
        ref = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(s)).images[0]
        assert np.array_equal(_pixels(res.images[0][j]), _pixels(ref)), f"seed {s}"


def test_every_layer_equals_a_hook_on_the_encoder(pipe):
    """Layer l = the output of encoder layer l (layer 0: the embeddings) through the encoder's final LayerNorm,
    recomputed from forward hooks and F.layer_norm (independent of output_hidden_states)."""
    enc = pipe.text_encoder
    n = diffusion.n_text_layers(pipe)
    got = diffusion.layer_prompt_embeds(pipe, PROMPT, range(n + 1))
    captured = {}

    def first_input(module, args, kwargs):
        captured[0] = args[0] if args else kwargs["hidden_states"]

    blocks = [m for name, m in enc.named_modules() if name.endswith(tuple(f"layers.{i}" for i in range(n)))]
    assert len(blocks) == n
    hooks = [blocks[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    for i, blk in enumerate(blocks):
        hooks.append(blk.register_forward_hook(
            lambda m, inp, out, i=i: captured.__setitem__(i + 1, out[0] if isinstance(out, tuple) else out)))
    try:
        ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            enc(ids)
    finally:
        for h in hooks:
            h.remove()
    norm = diffusion.final_norm(enc)
    assert sorted(captured) == list(range(n + 1))
    for l in range(n + 1):
        ref = torch.nn.functional.layer_norm(captured[l], (captured[l].shape[-1],), norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(got[l], ref, atol=TIGHT, rtol=TIGHT, msg=f"layer {l}")


def test_layers_differ_and_seeds_repeat(pipe, tmp_path):
    res = diffusion.diffusion_lens(pipe, PROMPT, layers=[0, 1, -1], num_images=2, num_inference_steps=2)
    assert res.layers == [0, 1, 3] and res.seeds == [0, 1]
    assert not np.array_equal(_pixels(res.images[0][0]), _pixels(res.images[2][0]))  # the layer matters
    again = diffusion.diffusion_lens(pipe, PROMPT, layers=[1], num_images=1, num_inference_steps=2)
    assert np.array_equal(_pixels(again.images[0][0]), _pixels(res.images[1][0]))  # same seed, same image
    folder = res.save_gallery(tmp_path / "gallery")
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["index.html", "layer00_seed0.png", "layer00_seed1.png", "layer01_seed0.png",
                     "layer01_seed1.png", "layer03_seed0.png", "layer03_seed1.png"]
    page = (folder / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 6 and "cdn" not in page.lower()
    d = json.loads(res.to_json())
    assert d["layers"] == [0, 1, 3] and d["files"][2][1] == "layer03_seed1.png"
    assert len(res.to_dataframe()) == 6
    res.print(width=120)


def test_pipeline_loads_from_a_local_folder_only(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sd")
    again = diffusion.load_pipeline(tmp_path / "sd")
    a = diffusion.layer_prompt_embeds(again, PROMPT, [2])[2]
    b = diffusion.layer_prompt_embeds(pipe, PROMPT, [2])[2]
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ModelLoadError, match="model_index.json"):
        diffusion.load_pipeline(tmp_path / "nothing")


def test_bad_input_names_the_fix(pipe):
    with pytest.raises(LensInputError, match="layers 0..3"):
        diffusion.diffusion_lens(pipe, PROMPT, layers=[7])
    with pytest.raises(LensInputError, match="non-empty"):
        diffusion.diffusion_lens(pipe, "")

    class TwoEncoders:
        text_encoder_2 = object()

    with pytest.raises(LensInputError, match="two text encoders"):
        diffusion.diffusion_lens(TwoEncoders(), PROMPT)
    assert mi_lenses.diffusion_lens is diffusion.diffusion_lens


def test_command_writes_the_gallery(pipe, tmp_path, capsys):
    from mi_lenses.cli import main

    pipe.save_pretrained(tmp_path / "sd")
    rc = main(["diffusion-lens", "--pipeline", str(tmp_path / "sd"), "--prompt", PROMPT, "--layers", "0,3",
               "--num-inference-steps", "2", "--out", str(tmp_path / "g"), "--json", str(tmp_path / "d.json")])
    assert rc == 0
    assert (tmp_path / "g" / "layer03_seed0.png").is_file()
    assert json.loads((tmp_path / "d.json").read_text())["layers"] == [0, 3]
    assert main(["diffusion-lens", "--pipeline", str(tmp_path / "none"), "--prompt", PROMPT]) == 2
    assert "model_index.json" in capsys.readouterr().err


def test_layers_equal_diffusers_clip_skip_where_it_works(pipe):
    n = diffusion.n_text_layers(pipe)
    try:
        with torch.no_grad():
            theirs = {l: pipe.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=n - l)[0] for l in range(1, n)}
    except AttributeError as err:  # diffusers reads text_model.final_layer_norm, gone in transformers 5
        pytest.skip(f"this diffusers/transformers pair has no working clip_skip ({err})")
    ours = diffusion.layer_prompt_embeds(pipe, PROMPT, range(1, n))
    for l in range(1, n):
        torch.testing.assert_close(ours[l], theirs[l], atol=0, rtol=0)
