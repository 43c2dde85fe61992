"""The prompts every library is timed on: token ids, identical for all of them (no library re-tokenises).

A model with a tokenizer (real weights) gets real text: :data:`TEXT` through the model's own tokenizer
(BOS as its file says), repeated end to end until long enough, so a trained model sees the kind of input it
was trained on and its greedy continuation is text rather than noise. Row ``b`` of a batch starts
``b * ROW_OFFSET`` tokens into that stream, so the rows differ. A model without one (the random-weight
presets) gets uniformly random ids from a seeded generator, as the benchmark always did.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Plain English prose written for this benchmark (no third-party text), long enough that a 128-token prompt
# does not repeat for any common vocabulary.
TEXT = (
    "The lighthouse keeper woke before dawn, as he had every morning for thirty years. He climbed the spiral "
    "stairs, counting the steps out of habit, and checked the lamp, the lens and the small brass clock that "
    "kept time for the whole island. Outside, the sea was calm and grey, and a thin line of light was "
    "spreading along the horizon. Boats from the village would leave the harbour within the hour, and he "
    "liked to watch them go, one after another, their engines coughing in the cold air. After breakfast he "
    "wrote in the logbook: the wind from the north-west, the pressure falling slowly, a freighter passing "
    "far to the south. Then he walked down to the garden, where the potatoes and the beans grew in the "
    "shelter of a stone wall his grandfather had built. In the afternoon a letter arrived with the supply "
    "boat. His daughter, who lived in the city and worked as an engineer, wrote that she would visit in the "
    "summer with her two children. They wanted to see the seals on the rocks, climb the tower and learn how "
    "the great lamp turned through the night. He read the letter twice, folded it carefully and put it in "
    "his coat pocket, and for the rest of the day he whistled old songs while he painted the railings."
)
ROW_OFFSET = 17  # tokens between the starts of consecutive rows of a batch


class Prompts:
    """Token-id prompts for one model: real text through ``tokenizer``, or random ids when it is None."""

    def __init__(self, vocab_size: int, tokenizer: object | None = None):
        self.vocab_size = vocab_size
        self._stream: list[int] = []
        if tokenizer is not None:
            self._stream = [i for i in tokenizer.encode(TEXT) if 0 <= i < vocab_size]
            if len(self._stream) < 2 * ROW_OFFSET:  # a degenerate vocabulary: random ids say more
                self._stream = []
        self.source = "text" if self._stream else "random"

    def ids(self, batch: int, n: int, generator: torch.Generator, device: str | torch.device = "cpu") -> torch.Tensor:
        """``[batch, n]`` prompt ids. Random ids are drawn from ``generator`` (as the benchmark always drew
        them); text ids ignore it."""
        if not self._stream:
            return torch.randint(0, self.vocab_size, (batch, n), generator=generator).to(device)
        need = (batch - 1) * ROW_OFFSET + n
        stream = self._stream * (need // len(self._stream) + 1)
        rows = [stream[b * ROW_OFFSET: b * ROW_OFFSET + n] for b in range(batch)]
        return torch.tensor(rows, dtype=torch.long, device=device)

    def describe(self) -> str:
        return ("a fixed English text through the model's tokenizer, repeated to length" if self._stream
                else "uniformly random token ids (seeded)")


def load_tokenizer(path: str | Path) -> object | None:
    """The model's tokenizer, or None (logged) when the checkpoint has none."""
    from ..tokenizer import Tokenizer

    try:
        return Tokenizer.from_pretrained(path)
    except (FileNotFoundError, OSError, ValueError) as e:
        logger.info("no tokenizer for %s (%s): prompts are random ids", path, e)
        return None
