"""Multi-turn video agent: questions about a video that grows, in one SGLang frontend program.

Turn 1 asks about the first clip; turn 2 appends the next clip of the same scene (``sgl.video``) and asks
across both; turn 3 asks again without new footage (more turns alternate: a new clip, then a question alone).
Each turn sends the whole conversation: the radix cache serves the earlier turns (the videos included) from
the uncompressed prefix it keeps, only the new text and the new clip are prefilled, and each turn compresses a
private copy for its own question (the text prior depends on the question). Clips are real mp4 files
(H.264, written here from synthetic frames) that the server decodes and samples itself, as it would a user's
upload. By default it starts a CPU server on a tiny random Qwen2.5-VL (built offline; its answers are noise,
the plumbing and the numbers are real)::

    .venv/bin/python examples/multi_turn_video_qa.py --json out.json
    python examples/multi_turn_video_qa.py --model-path Qwen/Qwen2.5-VL-7B-Instruct --device cuda
    python examples/multi_turn_video_qa.py --url http://127.0.0.1:30000

``--json`` writes per turn ``prompt_tokens``, ``cached_tokens`` (served by the radix cache), ``video_tokens``
(all videos of the conversation so far), ``kv_bytes_device`` and ``kv_bytes_full`` (the request's compressed
device KV and what the full cache would hold).

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

from sglang_hybridkv.frontend import MediaEndpoint
from sglang_hybridkv.runtime.media import QWEN_VL_VIDEO
from sglang_hybridkv.testing.frames import write_clip
from sglang_hybridkv.testing.models import cached_checkpoint
from sglang_hybridkv.testing.server import cpu_env, cpu_settings, sglang_server

# (new clip?, question) per turn; turns past these alternate a new clip and a question alone.
SCRIPT = [(True, "Describe what happens in this clip."),
          (True, "Here is what the camera recorded next. Across both clips, where does the orange square go?"),
          (False, "In which of the two clips is the square further to the right?")]
MORE = [(True, "More footage. What changed since the last clip?"), (False, "Summarise the whole video so far.")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-path", default=None, help="default: a tiny random Qwen2.5-VL, built offline")
    p.add_argument("--url", default=None, help="use a running server instead of starting one")
    p.add_argument("--engine", action="store_true", help="run in-process on sgl.Engine instead of a server")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--frames", type=int, default=24, help="frames per clip (4 fps; the server samples 2 fps)")
    p.add_argument("--turns", type=int, default=len(SCRIPT))
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def script(turns: int) -> list[tuple[bool, str]]:
    return (SCRIPT + MORE * turns)[:turns]


@sgl.function
def video_agent(s, clips: list[str | None], questions: list[str], frames: int, answer_tokens: int):
    for i, (clip, question) in enumerate(zip(clips, questions)):
        s += sgl.user_begin()
        if clip is not None:
            s += sgl.video(clip, frames)
        s += question
        s += sgl.user_end()
        s += sgl.assistant(sgl.gen(f"answer_{i}", max_tokens=answer_tokens, temperature=0))


def run(url: str, clips: list[str | None], questions: list[str], frames: int, max_new_tokens: int) -> list[dict]:
    backend = MediaEndpoint(url)
    backend.chat_template = get_chat_template("qwen2-vl")  # the Qwen2-VL / Qwen2.5-VL conversation format
    t0 = time.perf_counter()
    state = video_agent.run(clips=clips, questions=questions, frames=frames, answer_tokens=max_new_tokens,
                            backend=backend)
    turns = [_turn(q, c is not None, state[f"answer_{i}"], state.get_meta_info(f"answer_{i}"))
             for i, (c, q) in enumerate(zip(clips, questions))]
    _print(turns, frames, time.perf_counter() - t0)  # the program's answers are all in by now
    return turns


def run_engine(model: str, device: str, budget: float, clips: list[str | None], questions: list[str], frames: int,
               max_new_tokens: int) -> list[dict]:
    """The same conversation on ``sgl.Engine`` in this process, with compression on."""
    if device == "cpu":
        os.environ.update(cpu_env())  # inherited by the engine's scheduler processes
    extra = cpu_settings() if device == "cpu" else {}
    engine = sgl.Engine(model_path=model, device=device, kv_compression="hybridkv", hybridkv_budget=budget, **extra)
    try:
        template = get_chat_template("qwen2-vl")
        messages = [{"role": "system", "content": None}]  # None: the template's default system prompt
        videos, turns = [], []
        t0 = time.perf_counter()
        for clip, question in zip(clips, questions):
            if clip is not None:
                videos.append(clip)
            messages.append({"role": "user", "content": (QWEN_VL_VIDEO if clip is not None else "") + question})
            prompt = template.get_prompt(messages) + template.role_prefix_and_suffix["assistant"][0]
            out = engine.generate(prompt=prompt, video_data=list(videos),
                                  sampling_params={"max_new_tokens": max_new_tokens, "temperature": 0})
            messages.append({"role": "assistant", "content": out["text"]})
            turns.append(_turn(question, clip is not None, out["text"], out["meta_info"]))
        _print(turns, frames, time.perf_counter() - t0)
        return turns
    finally:
        engine.shutdown()


def _turn(question: str, new_clip: bool, answer: str, meta: dict) -> dict:
    stats = meta.get("hybridkv") or {}
    return {"question": question, "new_clip": new_clip, "answer": answer, "prompt_tokens": meta["prompt_tokens"],
            "cached_tokens": meta["cached_tokens"], "video_tokens": meta.get("video_tokens", 0),
            "media_tokens": stats.get("media_tokens", 0), "kv_bytes_full": stats.get("kv_bytes_full"),
            "kv_bytes_device": stats.get("kv_bytes_device"), "e2e_s": meta.get("e2e_latency")}


def _print(turns: list[dict], frames: int, total: float) -> None:
    print(f"\n{sum(t['new_clip'] for t in turns)} clips of {frames} frames, {len(turns)} turns in {total:.1f}s")
    print(f"{'turn':>4} {'clip':>4} {'prompt':>6} {'cached':>6} {'video':>5} {'KV device':>11} {'KV full':>11} "
          f"{'ratio':>5} {'s':>6}  answer")
    for i, t in enumerate(turns):
        ratio = t["kv_bytes_full"] / t["kv_bytes_device"] if t["kv_bytes_device"] else float("nan")
        print(f"{i + 1:>4} {'new' if t['new_clip'] else '-':>4} {t['prompt_tokens']:>6} {t['cached_tokens']:>6} "
              f"{t['video_tokens']:>5} {t['kv_bytes_device'] or 0:>11,} {t['kv_bytes_full'] or 0:>11,} "
              f"{ratio:>5.1f} {t['e2e_s'] or 0:>6.2f}  {t['answer'].strip()[:32]!r}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    plan = script(args.turns)
    questions = [q for _, q in plan]
    with tempfile.TemporaryDirectory() as tmp:
        clips, shown = [], 0
        for i, (new, _) in enumerate(plan):
            # Each new clip continues the previous one: the scene's frames shown-.. shown+frames-1.
            clips.append(write_clip(os.path.join(tmp, f"clip{i}.mp4"), args.frames, first=shown) if new else None)
            shown += args.frames if new else 0
        model = args.model_path or (None if args.url else cached_checkpoint("tiny-qwen2.5-vl"))
        if args.url:
            turns = run(args.url, clips, questions, args.frames, args.max_new_tokens)
        elif args.engine:
            turns = run_engine(model, args.device, args.budget, clips, questions, args.frames, args.max_new_tokens)
        else:
            extra = ["--kv-compression", "hybridkv", "--hybridkv-budget", str(args.budget)]
            with sglang_server(model, extra_args=extra, device=args.device, progress=True) as url:
                turns = run(url, clips, questions, args.frames, args.max_new_tokens)
    report = {"budget": args.budget, "frames_per_clip": args.frames, "turns": turns}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
