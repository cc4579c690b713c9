"""circuit-tracer 0.5.0 as the oracle of attribution graphs: run in its own environment (``.venv-ct``, made by
``bash scripts/setup.sh --ct``; circuit-tracer needs transformers 4.57 and TransformerLens 3.x) as
``.venv-ct/bin/python tests/oracle_circuit_tracer.py SPEC_DIR OUT.pt``. It never imports mi_lenses.

SPEC_DIR holds ``model/`` (a ``LlamaForCausalLM`` written by ``save_pretrained``, here usually by transformers 5.x) and
``spec.pt``: ``tokens`` [S] (position 0 BOS-like), ``transcoders`` (per layer: ``W_enc`` [n, d], ``b_enc`` [n],
``W_dec`` [n, d], ``b_dec`` [d], ``W_skip`` [d_out, d_in] or None (circuit-tracer's orientation: skip = x @ W_skip.T),
``k`` (TopK) or ``threshold`` [n] (JumpReLU) or neither (ReLU)), ``feature_input_hook``, ``feature_output_hook``,
``max_feature_nodes``, ``batch_size``, ``max_n_logits``, ``desired_logit_prob`` and optionally ``hf_logits`` [S, V] (the
writer's own logits, compared with transformers 4.57's). The model is rebuilt as circuit-tracer's
``TransformerLensReplacementModel`` without any hub access (config by hand, TransformerLens's Llama weight conversion,
no folding or centring, as ``from_pretrained_and_transcoders`` does); ``circuit_tracer.attribute`` runs on CPU in
float32 and the graph is saved to OUT.pt; one JSON line is printed. ``seconds`` times ``attribute`` alone: on a busy
shared machine a tiny model's time is dominated by thread contention (set ``OMP_NUM_THREADS=1`` to compare timings).

Circuit-tracer's conventions: features and error nodes at position 0 are zeroed (so position 0 has no feature nodes);
TopK keeps the k largest pre-activations with no ReLU; JumpReLU is ``x * (x > threshold)``; node order is
[active features, errors (layer-major, then position), tokens, logits], rows are targets, columns sources.

Usage, from the main environment (a tiny random Llama and TopK transcoders, with and without a skip connection)::

    import subprocess, sys, torch
    from pathlib import Path
    from transformers import LlamaConfig, LlamaForCausalLM

    def make_spec(spec_dir: Path, skip: bool) -> None:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, rope_theta=1000.0, initializer_range=0.1)
        hf = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith("norm.weight"):
                    p.copy_(1 + 0.3 * torch.randn_like(p))
        hf.save_pretrained(spec_dir / "model")
        g, n, d = torch.Generator().manual_seed(1), 96, cfg.hidden_size
        tc = lambda: {"W_enc": torch.randn(n, d, generator=g) * 0.3, "b_enc": torch.randn(n, generator=g) * 0.1,
                      "W_dec": torch.randn(n, d, generator=g) * 0.1, "b_dec": torch.randn(d, generator=g) * 0.05,
                      "W_skip": torch.randn(d, d, generator=g) * 0.05 if skip else None, "k": 8}
        tokens = torch.randint(1, cfg.vocab_size, (10,), generator=g)
        tokens[0] = cfg.bos_token_id
        with torch.no_grad():
            hf_logits = hf(tokens[None]).logits[0]
        torch.save({"tokens": tokens, "transcoders": [tc() for _ in range(cfg.num_hidden_layers)],
                    "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out",
                    "max_feature_nodes": None, "batch_size": 64, "max_n_logits": 10, "desired_logit_prob": 0.95,
                    "hf_logits": hf_logits}, spec_dir / "spec.pt")

    for skip in (False, True):
        spec = Path(f"/tmp/ct-spec-{skip}")
        make_spec(spec, skip)
        subprocess.run([".venv-ct/bin/python", "tests/oracle_circuit_tracer.py", spec, spec / "out.pt"], check=True)
        graph = torch.load(spec / "out.pt")
        print(graph["adjacency_matrix"].shape, len(graph["active_features"]), graph["tl_vs_hf_max_abs"])
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def hf_model(folder: Path):
    """transformers 4.57 reads a 5.x config, except that it moved rope_theta into rope_parameters: put it back."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig.from_pretrained(folder)
    rope = getattr(cfg, "rope_parameters", None) or {}
    assert rope.get("rope_type", "default") == "default" and not cfg.rope_scaling, "only plain RoPE is supported"
    cfg.rope_theta = rope.get("rope_theta", cfg.rope_theta)
    return LlamaForCausalLM.from_pretrained(folder, config=cfg, dtype=torch.float32).eval()


def tl_config(hf_cfg):
    from transformer_lens import HookedTransformerConfig

    n_heads, d_head = hf_cfg.num_attention_heads, getattr(hf_cfg, "head_dim", None)
    d_head = d_head or hf_cfg.hidden_size // n_heads
    kv = hf_cfg.num_key_value_heads
    return HookedTransformerConfig(
        d_model=hf_cfg.hidden_size, d_head=d_head, n_heads=n_heads, d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers, n_ctx=min(hf_cfg.max_position_embeddings, 512), eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.hidden_act, n_key_value_heads=kv if kv != n_heads else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False, rotary_dim=d_head,
        rotary_base=hf_cfg.rope_theta, final_rms=True, gated_mlp=True, original_architecture="LlamaForCausalLM",
        tie_word_embeddings=hf_cfg.tie_word_embeddings, model_name="tiny-llama", dtype=torch.float32, device="cpu",
        init_weights=False)


def transcoder_set(spec: dict):
    from circuit_tracer.transcoder.activation_functions import JumpReLU, TopK
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet

    layers = {}
    for layer, t in enumerate(spec["transcoders"]):
        n, d = t["W_enc"].shape
        params = {k: t[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if t.get("W_skip") is not None:
            params["W_skip"] = t["W_skip"].float()
        if t.get("k") is not None:
            act = TopK(int(t["k"]))
        elif t.get("threshold") is not None:
            act = JumpReLU(t["threshold"].float(), 0.1)
            params["activation_function.threshold"] = t["threshold"].float()
        else:
            act = torch.nn.functional.relu
        tc = SingleLayerTranscoder(d, n, act, layer, skip_connection="W_skip" in params, device=torch.device("cpu"),
                                   dtype=torch.float32)
        tc.load_state_dict(params)
        layers[layer] = tc
    return TranscoderSet(layers, feature_input_hook=spec["feature_input_hook"],
                         feature_output_hook=spec["feature_output_hook"])


class Tokenizer:
    """Only what attribute() asks of a tokenizer: token 0 counts as special (so no BOS is prepended), and decode."""

    def __init__(self, bos: int, vocab_size: int):
        self.bos_token_id, self.pad_token_id, self.eos_token_id = bos, None, None
        self.all_special_ids, self.vocab_size, self.padding_side = [bos], vocab_size, "right"

    def decode(self, ids) -> str:
        return str(ids.tolist() if isinstance(ids, torch.Tensor) else ids)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class RssSampler:
    """The largest resident memory seen while it runs (sampled every 5 ms): the peak of one call, whatever the
    process's lifetime peak was before it (benchmarks/bench_graph.py measures both sides this way)."""

    def __init__(self):
        import threading

        self.peak, self._stop = rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mb())

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def main(spec_dir: Path, out: Path) -> dict:
    from circuit_tracer import attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    spec = torch.load(spec_dir / "spec.pt", weights_only=False)
    tokens = spec["tokens"].long()
    hf = hf_model(spec_dir / "model")
    cfg = tl_config(hf.config)
    # from_pretrained_and_transcoders without the hub: load the weights first (ReplacementMLP renames the MLP's keys)
    model = TransformerLensReplacementModel(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False)
    model._configure_replacement_model(transcoder_set(spec))
    model.tokenizer = Tokenizer(int(tokens[0]), cfg.d_vocab)
    with torch.no_grad():
        hf_logits = hf(tokens[None]).logits[0]
        tl_logits = model(tokens[None])[0]
    result = {"tl_vs_hf_max_abs": float((tl_logits - hf_logits).abs().max())}
    if spec.get("hf_logits") is not None:
        result["hf_vs_spec_max_abs"] = float((hf_logits - spec["hf_logits"].float()).abs().max())
    del hf

    rss_before, peak_before = rss_mb(), peak_rss_mb()
    start = time.perf_counter()
    with RssSampler() as sampler:
        graph = attribute(tokens, model, max_feature_nodes=spec["max_feature_nodes"], batch_size=spec["batch_size"],
                          max_n_logits=spec["max_n_logits"], desired_logit_prob=spec["desired_logit_prob"])
    seconds = time.perf_counter() - start
    result.update(
        adjacency_matrix=graph.adjacency_matrix.cpu(), active_features=graph.active_features.cpu(),
        selected_features=graph.selected_features.cpu(), activation_values=graph.activation_values.cpu(),
        logit_token_ids=graph.logit_token_ids.cpu(), logit_probabilities=graph.logit_probabilities.cpu(),
        n_layers=cfg.n_layers, seconds=seconds, threads=torch.get_num_threads(), rss_before_mb=rss_before,
        peak_rss_before_mb=peak_before, peak_rss_mb=peak_rss_mb(), peak_rss_during_mb=sampler.peak,
        versions={p: version(p) for p in ("circuit-tracer", "transformers", "transformer-lens", "torch")})
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    return result


if __name__ == "__main__":
    r = main(Path(sys.argv[1]), Path(sys.argv[2]))
    print("RESULTS " + json.dumps({
        "adjacency": list(r["adjacency_matrix"].shape), "active_features": len(r["active_features"]),
        "selected_features": len(r["selected_features"]), "logits": len(r["logit_token_ids"]),
        **{k: r[k] for k in ("tl_vs_hf_max_abs", "hf_vs_spec_max_abs", "seconds", "threads", "rss_before_mb",
                             "peak_rss_mb", "peak_rss_during_mb", "versions") if k in r}}))
