"""Training data: text files -> documents -> one packed token stream -> fixed-length windows.

Each document is encoded as ``[BOS] text [EOS]`` and the documents are concatenated into one stream
with a per-token document index. A training window is ``seq_len + 1`` consecutive tokens (inputs are
the first ``seq_len``, targets the last ``seq_len``), so no token is wasted at window edges. Windows
cross document boundaries; the boundaries are handled in the model, not by padding:

- position ids restart at 0 at every document start, as if each document were alone;
- from those restarts the model makes attention block-diagonal causal (a token only sees earlier tokens
  of its own document), as transformers does for packed position_ids, on fused kernels where it can
  (llama_core.modeling.document_attention); no [t, t] mask travels with the batch;
- a target that starts a new document (the BOS after an EOS) is not trained on: nothing before it
  in its window belongs to its document, so it is unpredictable by construction.

So a packed window gives exactly the loss and gradients of running each document piece on its own.
The window order is a seeded permutation per epoch, a pure function of (seed, epoch): the data
position is one integer (windows consumed so far), which is what makes resuming exact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..modeling.document_attention import dense_document_mask, document_starts, packed_document_ids
from ..tokenizer import Tokenizer

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEXT_SUFFIXES = (".txt", ".md", ".text")


def list_files(path: str | os.PathLike, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """``path`` itself, or every file with one of ``suffixes`` under a directory (sorted, recursive); ``kind``
    names them in the error when there is none."""
    root = Path(path)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"training data {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no {kind} files ({', '.join(suffixes)}) under {root}")
    return files


def read_text(file: Path) -> tuple[bytes, str]:
    """The file's bytes and their UTF-8 text; not UTF-8 is an error naming the file and the first bad byte."""
    raw = file.read_bytes()
    try:
        return raw, raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{file} is not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                         f"({e.reason})") from None


def read_documents(files: list[Path], separator: str | None = None) -> list[str]:
    """The documents of ``files``: each file is one document, or several split on ``separator``.

    Empty files, files of whitespace only and non-UTF-8 files are errors naming the file (and the byte
    offset of the first bad byte), raised before any training starts.
    """
    docs: list[str] = []
    for file in files:
        raw, text = read_text(file)
        if not text.strip():
            raise ValueError(f"{file} is empty" if not raw else f"{file} holds only whitespace")
        parts = text.split(separator) if separator else [text]
        docs += [p.strip() for p in parts if p.strip()]
    return docs


@dataclass
class TokenStream:
    """All documents back to back: ``tokens [n]`` and ``doc_ids [n]`` (document index of each token).
    ``trainable [n]`` (bool), where given, says which tokens are targets to train on (chat data: the assistant
    replies); None trains on every token."""

    tokens: Tensor
    doc_ids: Tensor
    trainable: Tensor | None = None

    @property
    def num_documents(self) -> int:
        return int(self.doc_ids[-1]) + 1 if len(self.doc_ids) else 0

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_documents(docs: list[str], tokenizer: Tokenizer, batch: int = 512) -> TokenStream:
    """Encode ``docs`` as ``[BOS] text [EOS]`` (where the tokenizer has them) and concatenate."""
    tokens: list[int] = []
    doc_ids: list[int] = []
    for start in range(0, len(docs), batch):
        rows = tokenizer(docs[start:start + batch], add_bos=tokenizer.bos_id is not None,
                         add_eos=tokenizer.eos_id is not None, padding=False, return_tensors=None)["input_ids"]
        for k, row in enumerate(rows):
            tokens += row
            doc_ids += [start + k] * len(row)
    return TokenStream(torch.tensor(tokens, dtype=torch.int64), torch.tensor(doc_ids, dtype=torch.int64))


def load_token_stream(path: str | os.PathLike, tokenizer: Tokenizer, separator: str | None = None) -> TokenStream:
    files = list_files(path, TEXT_SUFFIXES, "text")
    docs = read_documents(files, separator)
    stream = tokenize_documents(docs, tokenizer)
    logger.info("data: %d files, %d documents, %d tokens", len(files), len(docs), len(stream))
    return stream


@dataclass
class Batch:
    """One micro-batch: model inputs and the (already shifted) targets. The documents are told by the
    position ids alone: ``model(input_ids, position_ids=position_ids)`` attends within documents."""

    input_ids: Tensor  # [b, t]
    position_ids: Tensor  # [b, t], restarting at 0 at each document start
    targets: Tensor  # [b, t], IGNORE_INDEX where the target starts a new document

    @property
    def num_targets(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())

    def dense_attention_mask(self) -> Tensor:
        """The explicit ``[b, 1, t, t]`` block-diagonal causal mask the position ids stand for (O(t^2)
        memory: for callers that pass masks themselves, not for training)."""
        return dense_document_mask(packed_document_ids(self.position_ids, self.position_ids.shape[0]))


def pack_windows(tokens: Tensor, doc_ids: Tensor, trainable: Tensor | None = None) -> Batch:
    """``tokens/doc_ids [b, t + 1]`` (consecutive stream slices) -> a Batch of length ``t``, on their device.
    ``trainable [b, t + 1]`` (bool): only those tokens are targets; the others are IGNORE_INDEX."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:].clone()
    docs, target_docs = doc_ids[:, :-1], doc_ids[:, 1:]
    targets[target_docs != docs] = IGNORE_INDEX
    if trainable is not None:
        targets[~trainable[:, 1:]] = IGNORE_INDEX
    t = inputs.shape[1]
    # Position of each token within its document: index minus the index of its document's first token
    # in this window (a document cut by the window's left edge restarts at 0, as if it began there).
    index = torch.arange(t, device=docs.device).expand_as(docs)
    first = torch.where(document_starts(docs), index, torch.zeros_like(index)).cummax(dim=1).values
    return Batch(inputs, index - first, targets)


class PackedWindows:
    """Fixed-length windows over a TokenStream, in a seeded order, sliced per rank and micro-batch.

    Window ``w`` is ``stream[w * seq_len : w * seq_len + seq_len + 1]``. The global order concatenates one
    permutation of all windows per epoch; an optimizer step takes the next ``global_batch`` windows in that
    order; data-parallel rank ``r`` takes its contiguous share, cut into
    micro-batches. Any world size with the same global batch sees the same windows at the same step.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int = 0):
        self.stream = stream
        self.seq_len = seq_len
        self.seed = seed
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"the data has {len(stream)} tokens, fewer than one training window of seq_len + 1 = "
                             f"{seq_len + 1}; add data or lower the sequence length")
        self._epoch = -1
        self._order = torch.empty(0, dtype=torch.int64)

    def _window_index(self, k: int) -> int:
        epoch, offset = divmod(k, self.num_windows)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._order, self._epoch = torch.randperm(self.num_windows, generator=g), epoch
        return int(self._order[offset])

    def windows(self, first: int, count: int, device: torch.device | None = None) -> Batch:
        """Windows ``first .. first + count - 1`` of the global order as one Batch, packed on ``device``."""
        rows = [self._window_index(k) * self.seq_len for k in range(first, first + count)]
        span = self.seq_len + 1
        tokens = torch.stack([self.stream.tokens[r:r + span] for r in rows]).to(device)
        doc_ids = torch.stack([self.stream.doc_ids[r:r + span] for r in rows]).to(device)
        trainable = self.stream.trainable
        if trainable is not None:
            trainable = torch.stack([trainable[r:r + span] for r in rows]).to(device)
        return pack_windows(tokens, doc_ids, trainable)

    def step_batches(self, first_window: int, global_batch: int, micro_batch: int, rank: int, ranks: int,
                     device: torch.device | None = None) -> list[Batch]:
        """This rank's micro-batches of the optimizer step whose global batch starts at ``first_window``."""
        per_rank = global_batch // ranks
        first = first_window + rank * per_rank
        return [self.windows(first + m, micro_batch, device) for m in range(0, per_rank, micro_batch)]

    def epoch_of(self, consumed_windows: int) -> float:
        return consumed_windows / self.num_windows
