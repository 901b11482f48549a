""""Security log" tasks: a second task family with its own template and question kinds.

Held out from the knob study's choices (``benchmarks/fidelity.py --tasks security_log``): where the
captioned-video set is ``Frame i: caption`` lines and questions about signs, numbers and colours, this one is a
timestamped camera log of an office entrance (``[08:14:05] cam 3: ...``) and asks for door codes, names on
badges, words on banners, room numbers and parcel colours. The log lines are the media span, the question is
text. Like every family here it is a needle design (DESIGN.md §5); kinds on which the full cache of SmolLM2
scores below 80 % are measured and left out by the benchmark.
"""

from __future__ import annotations

import random
from typing import Callable

from .captioned_video import Task

ROUTINE = [
    "an employee swipes a card at the gate.", "the lobby lights flicker once.", "a cleaner mops the floor.",
    "two visitors wait on the sofa.", "the receptionist answers the phone.", "a courier walks past the desk.",
    "the elevator doors open and close.", "a guard checks the monitors.", "someone holds the door open.",
    "a man carries a coffee cup to the lift.", "the revolving door turns slowly.", "a woman signs the visitor book.",
]
NAMES = ["Margaret", "Oliver", "Priya", "Hiroshi", "Fatima", "Lucas", "Ingrid", "Mateo"]
WORDS = ["OPEN", "WELCOME", "DANGER", "SALE", "EXIT", "QUIET"]
COLORS = ["red", "green", "yellow", "purple", "orange", "white"]


def _log(rng: random.Random, n: int) -> list[str]:
    start = rng.randrange(6 * 3600, 10 * 3600)
    times = sorted(rng.sample(range(start, start + 60 * n), n))
    return [f"[{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}] cam {rng.randint(1, 4)}: {rng.choice(ROUTINE)}"
            for t in times]


def _task(rng: random.Random, n: int, event: str, question: str, family: str, answer: str) -> Task:
    lines = _log(rng, n)
    i = rng.randrange(n)
    lines[i] = lines[i][: lines[i].index(": ") + 2] + event
    pieces = [("Security camera log, main entrance:\n", False), ("\n".join(lines) + "\n", True), (question, False)]
    return Task(family, pieces, answer)


def door_code(rng: random.Random, n: int) -> Task:
    code = str(rng.randint(1000, 9999))
    return _task(rng, n, f"a technician types the code {code} into the door keypad.",
                 "Which code did the technician type into the keypad? The code was", "door_code", code)


def badge_name(rng: random.Random, n: int) -> Task:
    name = rng.choice(NAMES)
    return _task(rng, n, f"a visitor shows a badge with the name {name}.",
                 "What name is on the visitor's badge? The name on the badge is", "badge_name", name)


def banner_word(rng: random.Random, n: int) -> Task:
    word = rng.choice(WORDS)
    return _task(rng, n, f"workers hang a large banner that reads {word}.",
                 "What does the banner that the workers hang read? The banner reads", "banner_word", word)


def room_number(rng: random.Random, n: int) -> Task:
    room = str(rng.randint(100, 999))
    return _task(rng, n, f"a guest asks the receptionist for room {room}.",
                 "Which room did the guest ask for? The guest asked for room", "room_number", room)


def parcel_color(rng: random.Random, n: int) -> Task:
    c = rng.choice(COLORS)
    return _task(rng, n, f"a courier drops off a {c} parcel at the desk.",
                 "What color is the parcel the courier drops off? The parcel is", "parcel_color", c)


FAMILIES: dict[str, Callable[[random.Random, int], Task]] = {
    "door_code": door_code, "badge_name": badge_name, "banner_word": banner_word, "room_number": room_number,
    "parcel_color": parcel_color,
}


def make_tasks(families: list[str], per_family: int, lines: list[int], seed: int = 0) -> list[Task]:
    """``per_family`` tasks of each kind at each log length (in lines), reproducible from ``seed``."""
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; allowed: {sorted(FAMILIES)}")
    rng = random.Random(seed)
    return [FAMILIES[fam](rng, n) for n in lines for fam in families for _ in range(per_family)]
