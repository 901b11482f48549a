"""Long plain-text prompts for server tests: distinct per seed, one token per word, no model hub needed."""

WORDS = "red car parked near a tree while two people walk past the bakery on the corner at noon".split()


def filler(label: str, seed: int, n_words: int = 600) -> str:
    return f"{label} {seed}: " + " ".join(WORDS[(i * (seed + 3)) % len(WORDS)] for i in range(n_words))
