"""A small synthetic corpus and a tokenizer trained on it, for the training tests and the README example.

    python tests/train_corpus.py OUT_DIR    # writes OUT_DIR/corpus/*.txt and OUT_DIR/tokenizer/tokenizer.json

The stories follow simple templates, so a tiny model's loss falls quickly and visibly. The tokenizer is a
sentencepiece-style BPE (Metaspace) of 192 ids with <unk>, <s>, </s>, small enough for the `tiny` preset.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

NAMES = ["Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam"]
ANIMALS = ["cat", "dog", "bird", "frog", "fish", "bear"]
PLACES = ["park", "garden", "house", "forest", "river", "school"]
COLORS = ["red", "blue", "green", "yellow", "big", "small"]
FEELINGS = ["happy", "sad", "tired", "excited", "scared"]


def story(rng: random.Random) -> str:
    name, friend = rng.sample(NAMES, 2)
    animal, place, color, feeling = (rng.choice(x) for x in (ANIMALS, PLACES, COLORS, FEELINGS))
    lines = [f"Once upon a time, there was a girl named {name}.",
             f"{name} had a {color} {animal}.",
             f"One day, {name} and the {animal} went to the {place}.",
             f"At the {place}, they met {friend}.",
             f"{friend} was {feeling}, so {name} gave {friend} a hug.",
             f"The {animal} was {feeling} too. The end."]
    return " ".join(lines[:rng.randint(3, len(lines))])


def write_corpus(directory: Path, files: int = 4, stories_per_file: int = 40, seed: int = 0) -> Path:
    """``files`` text files of stories separated by blank lines; returns the directory."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for k in range(files):
        text = "\n\n".join(story(rng) for _ in range(stories_per_file))
        (directory / f"stories_{k:02d}.txt").write_text(text + "\n", encoding="utf-8")
    return directory


def write_tokenizer(directory: Path, corpus: Path, vocab_size: int = 192) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    return directory


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "train-example")
    corpus = write_corpus(out / "corpus")
    write_tokenizer(out / "tokenizer", corpus)
    print(f"wrote {corpus} and {out / 'tokenizer'}")
