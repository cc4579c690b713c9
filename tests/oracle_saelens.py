"""SAELens as the oracle of mi_lenses's dictionaries: run in the TransformerLens 3.9 environment (``.venv-tl3``, where
``sae-lens`` installs), by ``tests/test_features.py::test_saelens_oracle`` (or directly:
``.venv-tl3/bin/python tests/oracle_saelens.py OUT_DIR``). Prints one JSON object: per case the largest absolute
differences, SAELens against mi_lenses, on a tiny random GQA ``HookedSAETransformer``.

* our files, SAELens's loader: every architecture SAELens reads (standard, jumprelu, topk with and without
  ``rescale_acts_by_decoder_norm``, transcoder, skip_transcoder, jumprelu_transcoder, jumprelu_skip_transcoder),
  ``apply_b_dec_to_input``, ``normalize_activations`` (``layer_norm``, ``constant_norm_rescale``) and a ``hook_z`` SAE
  are saved with ``mi_lenses.save_dictionary(format="saelens")``, loaded with ``SAE.load_from_disk`` and compared:
  SAELens's ``hook_sae_acts_post`` under ``HookedSAETransformer.run_with_cache_with_saes`` against
  ``mi_lenses.features(...).activations``, and ``sae(x)`` (a transcoder: its output, skip included) against the
  reconstruction ``x - error``;
* SAELens's files, our loader: SAEs and transcoders built by SAELens and written by its ``save_model`` are read by
  ``mi_lenses.load_dictionary`` and encode/decode the same vectors as SAELens.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def tiny_model():
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, n_key_value_heads=2,
                                  d_mlp=48, d_vocab=50, act_fn="silu", gated_mlp=True, normalization_type="RMS",
                                  positional_embedding_type="rotary", rotary_dim=8, seed=0, model_name="tiny-gqa")
    model = HookedSAETransformer(cfg).eval()
    import mi_lenses

    mi_lenses.skip_parity(model)
    return model


def rand(*shape, scale=1.0, g):
    return torch.randn(*shape, generator=g) * scale


def our_cases(model, g):
    from mi_lenses import Dictionary

    D, Z, n = model.cfg.d_model, model.cfg.n_heads * model.cfg.d_head, 96
    cases = {}

    def sae(hook, d_in=D, **kw):
        return Dictionary(rand(d_in, n, scale=0.4, g=g), rand(n, scale=0.1, g=g), rand(n, d_in, scale=0.2, g=g),
                          rand(d_in, scale=0.05, g=g), hook=hook, **kw)

    def tc(skip=False, **kw):
        return Dictionary(rand(D, n, scale=0.4, g=g), rand(n, scale=0.1, g=g), rand(n, D, scale=0.2, g=g),
                          rand(D, scale=0.05, g=g), hook="blocks.1.ln2.hook_normalized",
                          hook_out="blocks.1.hook_mlp_out", W_skip=rand(D, D, scale=0.1, g=g) if skip else None, **kw)

    thr = torch.rand(n, generator=g) * 0.3
    cases["standard"] = sae("blocks.1.hook_resid_post", apply_b_dec_to_input=True)
    cases["standard_no_bdec"] = sae("blocks.0.hook_mlp_out")
    cases["jumprelu"] = sae("blocks.1.hook_resid_post", activation="jumprelu", threshold=thr, apply_b_dec_to_input=True)
    cases["topk"] = sae("blocks.1.hook_attn_out", activation="topk", k=8)
    cases["topk_rescaled"] = sae("blocks.1.hook_resid_pre", activation="topk", k=8, rescale_acts_by_decoder_norm=True)
    cases["layer_norm"] = sae("blocks.1.hook_resid_post", normalize_activations="layer_norm", apply_b_dec_to_input=True)
    cases["constant_norm_rescale"] = sae("blocks.0.hook_resid_post", normalize_activations="constant_norm_rescale")
    cases["hook_z"] = sae("blocks.1.attn.hook_z", d_in=Z, activation="jumprelu", threshold=thr)
    cases["transcoder"] = tc()
    cases["skip_transcoder"] = tc(skip=True)
    cases["jumprelu_transcoder"] = tc(activation="jumprelu", threshold=thr)
    cases["jumprelu_skip_transcoder"] = tc(skip=True, activation="jumprelu", threshold=thr)
    return cases


def main(out: Path) -> dict:
    from sae_lens import SAE

    import mi_lenses

    g = torch.Generator().manual_seed(0)
    model = tiny_model()
    tokens = torch.randint(1, 50, (2, 12), generator=g)
    _, clean = model.run_with_cache(tokens)
    results: dict[str, dict[str, float]] = {}
    for name, d in our_cases(model, g).items():
        folder = mi_lenses.save_dictionary(d, out / name, format="saelens")
        sae = SAE.load_from_disk(folder)
        ours = mi_lenses.features(model, tokens, mi_lenses.load_dictionary(folder))
        x = clean[d.hook]
        with torch.no_grad():
            if d.is_transcoder:
                acts = sae.encode(x)
                recon = sae(x)
                ours_recon = clean[d.hook_out] - ours.error
            else:
                _, cache = model.run_with_cache_with_saes(tokens, saes=[sae])
                acts = cache[f"{d.hook}.hook_sae_acts_post"]
                recon = sae(x)
                ours_recon = (x.flatten(-2) if x.ndim == 4 else x) - ours.error
                recon = recon.flatten(-2) if recon.ndim == 4 else recon
        results[f"ours->saelens:{name}"] = {
            "activations": float((acts - ours.activations).abs().max()),
            "reconstruction": float((recon - ours_recon).abs().max()),
            "active": int((acts != 0).sum()),
            "architecture": type(sae).__name__}

    # feature DLA in this world: the transcoder's parts sum to the MLP's direct logit attribution
    tc = mi_lenses.load_dictionary(out / "skip_transcoder")
    r = mi_lenses.feature_dla(model, tokens, tc, answer=3, wrong=4)
    dla = mi_lenses.direct_logit_attribution(model, tokens, answer=3, wrong=4)
    results["tl3:feature_dla"] = {"activations": 0.0, "reconstruction": float((r.total - dla.mlps[:, 1]).abs().max()),
                                  "active": int((r.values != 0).sum()), "architecture": type(model).__name__}

    # SAELens's own files, read by mi_lenses
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        SkipTranscoder,
        SkipTranscoderConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    D, n = model.cfg.d_model, 64
    built = {
        "standard": StandardSAE(StandardSAEConfig(d_in=D, d_sae=n, metadata=SAEMetadata(
            hook_name="blocks.1.hook_resid_post"))),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=D, d_sae=n, metadata=SAEMetadata(
            hook_name="blocks.0.hook_resid_post"))),
        "topk": TopKSAE(TopKSAEConfig(d_in=D, d_sae=n, k=6, metadata=SAEMetadata(hook_name="blocks.1.hook_mlp_out"))),
        "skip_transcoder": SkipTranscoder(SkipTranscoderConfig(
            d_in=D, d_sae=n, d_out=D, apply_b_dec_to_input=False, metadata=SAEMetadata(
                hook_name="blocks.1.ln2.hook_normalized", hook_name_out="blocks.1.hook_mlp_out"))),
    }
    x = rand(40, D, g=g)
    for name, sae in built.items():
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(rand(*p.shape, scale=0.3, g=g))
            if hasattr(sae, "threshold"):
                sae.threshold.copy_(torch.rand(n, generator=g) * 0.3)
        sae.save_model(out / f"saelens-{name}")
        ours = mi_lenses.load_dictionary(out / f"saelens-{name}")
        with torch.no_grad():
            acts, recon = sae.encode(x), sae(x)
        a = ours.encode(x)
        results[f"saelens->ours:{name}"] = {"activations": float((acts - a).abs().max()),
                                            "reconstruction": float((recon - ours.decode(a, x)).abs().max()),
                                            "active": int((acts != 0).sum()), "architecture": type(sae).__name__}
    return results


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print("RESULTS " + json.dumps(main(out)))
