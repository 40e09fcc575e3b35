"""A conversation task made at run time whose answers can be checked exactly: the user says their name (and what
they like), and later asks for it back. The names of the held-out conversations never occur in training, so an
answer is right only where the model reads it from the conversation, turn after turn."""

import random

SYSTEM = "You are a helpful assistant."
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey", "pink"]
_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "gl"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "io"]


def make_names(count: int, seed: int) -> list[str]:
    """`count` distinct made-up names of two syllables, capitalised (at most 20,736 of them)."""
    rng, names = random.Random(seed), set()
    while len(names) < count:
        names.add("".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(2)).capitalize())
    return sorted(names)


def conversation(name: str, colour: str, rng: random.Random) -> tuple[list[dict], str]:
    """(the messages up to the last question, its answer): one or two facts told, then one asked back."""
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    messages += [{"role": "user", "content": f"My name is {name}."},
                 {"role": "assistant", "content": f"Hello, {name}!"}]  # fmt: skip
    told_colour = rng.random() < 0.6
    if told_colour:
        messages += [{"role": "user", "content": f"I like {colour}."},
                     {"role": "assistant", "content": f"{colour.capitalize()} is a fine colour."}]  # fmt: skip
    if told_colour and rng.random() < 0.5:
        return messages + [{"role": "user", "content": "What do I like?"}], f"You like {colour}."
    return messages + [{"role": "user", "content": "What is my name?"}], f"Your name is {name}."


def conversations(names: list[str], seed: int) -> list[tuple[list[dict], str]]:
    rng = random.Random(seed)
    return [conversation(name, rng.choice(COLOURS), rng) for name in names]


def as_training_records(dialogues: list[tuple[list[dict], str]]) -> list[dict]:
    """TRL's conversational records: the question's answer appended as the last assistant turn."""
    return [{"messages": [*messages, {"role": "assistant", "content": answer}]} for messages, answer in dialogues]
