"""Multi-turn video QA: several questions about one video (given as frames) in one SGLang frontend program.

Each turn sends the whole conversation; the radix cache serves the video and the earlier turns from the
uncompressed prefix it keeps, and each turn recompresses a private copy for its own question (the text prior
depends on the question). By default it starts a CPU server on a tiny random Qwen2.5-VL (built offline; its
answers are noise, the plumbing and the numbers are real)::

    .venv/bin/python examples/multi_turn_video_qa.py --json out.json
    python examples/multi_turn_video_qa.py --model-path Qwen/Qwen2.5-VL-7B-Instruct --device cuda
    python examples/multi_turn_video_qa.py --url http://127.0.0.1:30000

``--engine`` asks the same questions in-process through ``sgl.Engine(..., kv_compression="hybridkv")`` (no HTTP
server; the frontend language needs one, so the conversation is rendered with the same chat template and
sent with ``Engine.generate``). On a CPU the engine's processes need SGLang's CPU settings, which
``--device cpu`` sets (``SGLANG_USE_CPU_ENGINE=1`` and the ``sgl_kernel`` stand-in; see
``sglang_hybridkv/testing/server.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import sglang as sgl
from sglang.lang.chat_template import get_chat_template

from sglang_hybridkv.testing.frames import frame_png
from sglang_hybridkv.testing.models import cached_checkpoint
from sglang_hybridkv.testing.server import cpu_env, cpu_settings, sglang_server

QUESTIONS = ["Describe what happens in this video.", "What colour is the moving square?",
             "Does the square move left or right?", "How many frames show the square near the edge?"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: a tiny random Qwen2.5-VL, built offline")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--engine", action="store_true", help="run in-process on sgl.Engine instead of a server")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--frames", type=int, default=8, help="video frames (images; 64 tokens each on the default)")
    p.add_argument("--turns", type=int, default=len(QUESTIONS))
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


@sgl.function
def video_qa(s, frame_paths: list[str], questions: list[str], answer_tokens: int):
    for i, question in enumerate(questions):
        s += sgl.user_begin()
        if i == 0:
            for path in frame_paths:
                s += sgl.image(path)
        s += question
        s += sgl.user_end()
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=answer_tokens, temperature=0))


class FramesEndpoint(sgl.RuntimeEndpoint):
    """SGLang's HTTP frontend backend, sending every image of the conversation (the stock one sends one only;
    the server takes a list)."""

    def _add_images(self, s, data):
        if s.images_:
            data["image_data"] = [image for _, image in s.images_]


def run(url: str, frame_paths: list[str], questions: list[str], max_new_tokens: int) -> list[dict]:
    backend = FramesEndpoint(url)
    backend.chat_template = get_chat_template("qwen2-vl")  # the Qwen2.5-VL conversation format
    t0 = time.perf_counter()
    state = video_qa.run(frame_paths=frame_paths, questions=questions, answer_tokens=max_new_tokens,
                         backend=backend)
    turns = [_turn(q, state[f"answer_{i}"], state.get_meta_info(f"answer_{i}")) for i, q in enumerate(questions)]
    _print(turns, len(frame_paths), time.perf_counter() - t0)  # the program's answers are all in by now
    return turns


def run_engine(model: str, device: str, budget: float, frame_paths: list[str], questions: list[str],
               max_new_tokens: int) -> list[dict]:
    """The same conversation on ``sgl.Engine`` in this process, with compression on."""
    if device == "cpu":
        os.environ.update(cpu_env())  # inherited by the engine's scheduler processes
    extra = cpu_settings() if device == "cpu" else {}
    engine = sgl.Engine(model_path=model, device=device, kv_compression="hybridkv", hybridkv_budget=budget, **extra)
    try:
        template = get_chat_template("qwen2-vl")
        messages = [{"role": "system", "content": None}]  # None: the template's default system prompt
        turns = []
        t0 = time.perf_counter()
        for i, question in enumerate(questions):
            images = template.image_token * len(frame_paths) if i == 0 else ""
            messages.append({"role": "user", "content": images + question})
            prompt = template.get_prompt(messages) + template.role_prefix_and_suffix["assistant"][0]
            out = engine.generate(prompt=prompt, image_data=frame_paths,
                                  sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0})
            messages.append({"role": "assistant", "content": out["text"]})
            turns.append(_turn(question, out["text"], out["meta_info"]))
        _print(turns, len(frame_paths), time.perf_counter() - t0)
        return turns
    finally:
        engine.shutdown()


def _turn(question: str, answer: str, meta: dict) -> dict:
    stats = meta.get("hybridkv") or {}
    return {"question": question, "answer": answer, "prompt_tokens": meta["prompt_tokens"],
            "cached_tokens": meta["cached_tokens"], "media_tokens": meta.get("image_tokens", 0),
            "kv_bytes_full": stats.get("kv_bytes_full"), "kv_bytes_device": stats.get("kv_bytes_device"),
            "e2e_s": meta.get("e2e_latency")}


def _print(turns: list[dict], frames: int, total: float) -> None:
    print(f"\n{frames}-frame video, {len(turns)} turns in {total:.1f}s")
    print(f"{'turn':>4} {'prompt':>6} {'cached':>6} {'media':>5} {'KV device':>11} {'KV full':>11} {'s':>6}  answer")
    for i, t in enumerate(turns):
        print(f"{i + 1:>4} {t['prompt_tokens']:>6} {t['cached_tokens']:>6} {t['media_tokens']:>5} "
              f"{t['kv_bytes_device'] or 0:>11,} {t['kv_bytes_full'] or 0:>11,} {t['e2e_s'] or 0:>6.2f}  "
              f"{t['answer'].strip()[:40]!r}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    questions = (QUESTIONS * (1 + args.turns // len(QUESTIONS)))[: args.turns]
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.frames):
            paths.append(os.path.join(tmp, f"frame{i:03d}.png"))
            with open(paths[-1], "wb") as f:
                f.write(frame_png(i))
        model = args.model_path or (None if args.url else cached_checkpoint("tiny-qwen2.5-vl"))
        if args.url:
            turns = run(args.url, paths, questions, args.max_new_tokens)
        elif args.engine:
            turns = run_engine(model, args.device, args.budget, paths, questions, args.max_new_tokens)
        else:
            extra = ["--kv-compression", "hybridkv", "--hybridkv-budget", str(args.budget)]
            with sglang_server(model, extra_args=extra, device=args.device, progress=True) as url:
                turns = run(url, paths, questions, args.max_new_tokens)
    report = {"turns": turns}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
