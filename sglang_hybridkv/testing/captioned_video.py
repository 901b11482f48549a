""""Captioned video" tasks: a long media span of per-frame captions, then a question about one frame.

Without a trained VLM, a text model reading frame captions stands in for a VLM reading frame tokens: the
captions are marked as media, the question is text. Only *needle* designs are used — mundane frames with
one or a few distinctive ones — because SmolLM2-135M finds distinctive content reliably but cannot look a
fact up by frame index even with the full cache (DESIGN.md §5). Each family is kept only where the full
cache answers at least 80 % (the fidelity benchmark prints that score). Measured and dropped (full cache,
SmolLM2, 5 tasks each at 48/96 frames): "which animal crosses the road" 0/5 and 0/5 (it answers "dog"),
"licence plate of the car" 2/5 and 1/5. Kept: sign_number 5/5 5/5, two_needles 5/5 4/5, distractor_sign
5/5 4/5, bib_number 5/5 2/5, color 4/5 1/5 — the last two only at 48 frames.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch

MUNDANE = [
    "a cyclist passes by.", "cars wait at a traffic light.", "a dog sniffs the pavement.",
    "pedestrians cross the street.", "a bus stops at the corner.", "leaves blow across the sidewalk.",
    "a woman walks with a stroller.", "a cyclist rings a bell.", "a delivery van parks.",
    "two people talk near a bench.", "a taxi drives past.", "a shop opens its shutters.",
]
ANIMALS = ["giraffe", "penguin", "kangaroo", "zebra", "camel", "elephant", "flamingo", "crocodile"]
COLORS = ["purple", "orange", "yellow", "green", "pink", "blue"]
NAMES = ["Alice", "Bob", "Carlos", "Diana", "Elena", "Frank"]


@dataclass
class Task:
    """One question about one captioned video.

    Attributes:
        family: task family name.
        pieces: ``[(text, is_media), ...]`` in prompt order.
        answer: gold answer string; correct when the greedy answer contains it.
    """

    family: str
    pieces: list[tuple[str, bool]]
    answer: str

    def encode(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids (1, L), media_mask (L,))``: pieces are tokenised separately so spans are exact."""
        ids: list[int] = []
        mask: list[bool] = []
        for text, is_media in self.pieces:
            piece = tokenizer(text, add_special_tokens=False).input_ids
            ids += piece
            mask += [is_media] * len(piece)
        return torch.tensor([ids]), torch.tensor(mask)

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.pieces)


def _frames(rng: random.Random, n: int) -> list[str]:
    return [f"Frame {i}: {rng.choice(MUNDANE)}" for i in range(n)]


def _video(frames: list[str], question: str, family: str, answer: str) -> Task:
    return Task(family, [("Video captions:\n", False), ("\n".join(frames) + "\n", True), (question, False)], answer)


def _one_needle(rng: random.Random, n: int, caption: str, question: str, family: str, answer: str) -> Task:
    f = _frames(rng, n)
    i = rng.randrange(n)
    f[i] = f"Frame {i}: {caption}"
    return _video(f, question, family, answer)


def sign_number(rng: random.Random, n: int) -> Task:
    num = str(rng.randint(10000, 99999))
    return _one_needle(rng, n, f"a man holds up a sign with the number {num}.",
                       "What number is on the sign held up in the video? The number on the sign is", "sign_number", num)


def bib_number(rng: random.Random, n: int) -> Task:
    num = str(rng.randint(100, 9999))
    return _one_needle(rng, n, f"a runner wearing bib number {num} crosses the finish line.",
                       "What is the bib number of the runner who crosses the finish line? The bib number is",
                       "bib_number", num)


def two_needles(rng: random.Random, n: int) -> Task:
    """A number sign and an animal in the same video; the question asks for the number."""
    num = str(rng.randint(10000, 99999))
    a = rng.choice(ANIMALS)
    f = _frames(rng, n)
    i, j = rng.sample(range(n), 2)
    f[i] = f"Frame {i}: a man holds up a sign with the number {num}."
    f[j] = f"Frame {j}: a {a} walks slowly across the road."
    return _video(f, "What number is on the sign held up in the video? The number on the sign is", "two_needles", num)


def distractor_sign(rng: random.Random, n: int) -> Task:
    """Several people hold signs with words; one sign carries a number."""
    num = str(rng.randint(10000, 99999))
    f = _frames(rng, n)
    spots = rng.sample(range(n), 4)
    for k, i in enumerate(spots[:3]):
        f[i] = f"Frame {i}: a woman holds up a sign that says {['HELLO', 'WELCOME', 'SALE'][k]}."
    f[spots[3]] = f"Frame {spots[3]}: a man holds up a sign with the number {num}."
    return _video(f, "What number is on the sign held up in the video? The number on the sign is", "distractor_sign", num)


def color(rng: random.Random, n: int) -> Task:
    c = rng.choice(COLORS)
    name = rng.choice(NAMES)
    return _one_needle(rng, n, f"{name} opens a bright {c} umbrella.",
                       f"What color is the umbrella that {name} opens? The umbrella is", "color", c)


FAMILIES: dict[str, Callable[[random.Random, int], Task]] = {
    "sign_number": sign_number, "bib_number": bib_number, "two_needles": two_needles,
    "distractor_sign": distractor_sign, "color": color,
}


def make_tasks(families: list[str], per_family: int, frames: list[int], seed: int = 0) -> list[Task]:
    """``per_family`` tasks of each family at each video length, reproducible from ``seed``."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; allowed: {sorted(FAMILIES)}")
    rng = random.Random(seed)
    return [FAMILIES[fam](rng, n) for n in frames for fam in families for _ in range(per_family)]
