"""`Tokenizer`: one class over the three tokenizer files Llama models ship with.

`Tokenizer.from_pretrained(dir_or_hub_id)` picks the backend from what the directory holds (see
`backends.py`): an HF `tokenizer.json` first, else a `tokenizer.model` that is either a Llama 3 tiktoken
ranks file or a sentencepiece model, else a single `.gguf` file (its vocabulary metadata, `gguf_vocab.py`).
On top of any backend this class adds BOS/EOS, batching with padding, chat
prompts (`chat_template.py`) and decoding through per-token bytes (`detokenize.py`), so streaming equals `decode`.

Conventions, the same for every backend:
- special-token text typed by a user is ordinary text unless `allow_special=True` (chat templates set it);
- `decode` keeps special tokens as their text unless `skip_special_tokens=True`, and never "cleans up"
  spaces (transformers' `clean_up_tokenization_spaces` breaks `decode(encode(x)) == x`);
- `pad_id` is the tokenizer's pad token, else Llama 3's `<|finetune_right_pad_id|>`, else EOS;
- BOS / EOS are added where the file says so (`add_bos_token`), as transformers and llama.cpp do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..model_io.atomic import atomic_file
from ..model_io.gguf_file import GGUF_SUFFIX, find_gguf
from ..model_io.hub import resolve_checkpoint
from ..modeling.config import read_json_object
from . import chat_template, detokenize, gguf_export, gguf_vocab, tiktoken_llama3
from .backends import Backend, HFBackend, SentencePieceBackend, TiktokenBackend, check_unicode
from .detokenize import IncrementalDecoder
from .gguf_vocab import GGUFBackend, json_bytes

logger = logging.getLogger(__name__)

# What from_pretrained downloads from the hub: the tokenizer, its config (chat template, special tokens), never
# the weights. Meta's original tokenizer.model sits under original/ in HF repos and is not needed there.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja"]
# Every file a tokenizer save owns in a directory: written, or removed when stale, since a leftover
# tokenizer.json would win over a new tokenizer.model and a chat_template.jinja over the config's template.
SAVED_FILES = frozenset([*TOKENIZER_FILES, "special_tokens_map.json"])

__all__ = ["TOKENIZER_FILES", "IncrementalDecoder", "Tokenizer"]


def _resolve(path_or_hub_id: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike | None,
             token: str | bool | None) -> Path:
    """A local file or directory; hub ids are downloaded (tokenizer files only) or found in the cache."""
    return resolve_checkpoint(path_or_hub_id, revision, cache_dir, token, allow_patterns=list(TOKENIZER_FILES),
                              what="tokenizer", allow_file=True)


def _read_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    return read_json_object(path) if path.is_file() else {}


def _is_gguf(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _check_text(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}" +
                        ("; call the tokenizer itself, tok(texts), for a batch" if isinstance(text, (list, tuple)) else ""))
    check_unicode(text)
    return text


class Tokenizer:
    """Llama tokenizer: encode/decode, padded batches, chat prompts, streaming decoding."""

    def __init__(self, backend: Backend, chat_template: str | None = None,
                 config: Mapping[str, Any] | None = None, name_or_path: str = ""):
        self.backend = backend
        self.chat_template = chat_template
        self.name_or_path = name_or_path
        config = config or {}
        self._config = dict(config)  # tokenizer_config.json as read, written back by save_pretrained
        self._special_ids = frozenset(backend.special_tokens.values())
        self._special_text = {i: t for t, i in backend.special_tokens.items()}

        def token_text(key: str, i: int | None) -> str | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                return value
            return self._special_text.get(i) if i is not None else None

        # What chat templates see as bos_token / eos_token / pad_token, as transformers passes them.
        self._template_tokens = {"bos_token": token_text("bos_token", backend.bos_id),
                                 "eos_token": token_text("eos_token", backend.eos_id),
                                 "pad_token": token_text("pad_token", backend.pad_id)}

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, *, gguf_file: str | None = None,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        token: str | bool | None = None) -> Tokenizer:
        """Load from a directory (or a tokenizer file in it) or a hub id. Looks for `tokenizer.json`, then
        `tokenizer.model`; a `tokenizer_config.json` / `chat_template.jinja` beside it supplies the chat template
        and, for `tokenizer.json`, the BOS/EOS/pad tokens. A `.gguf` file, a directory whose only tokenizer is
        one `.gguf` file, or `gguf_file=` naming one in a directory or hub repository (transformers' spelling)
        loads the vocabulary and chat template stored in that GGUF."""
        if gguf_file is not None:
            parts = Path(gguf_file).parts
            if Path(gguf_file).is_absolute() or ".." in parts or len(parts) != 1:
                raise ValueError(f"gguf_file={gguf_file!r} must be the name of a file inside {path_or_hub_id}")
            found_gguf = find_gguf(path_or_hub_id, gguf_file, revision, cache_dir, token)
            assert found_gguf is not None
            return cls.from_gguf(found_gguf, name_or_path=str(path_or_hub_id))
        path = _resolve(path_or_hub_id, revision, cache_dir, token)
        directory = path if path.is_dir() else path.parent
        if path.is_dir():
            found = [directory / n for n in ("tokenizer.json", "tokenizer.model") if (directory / n).is_file()]
            if not found:
                ggufs = sorted(directory.glob(f"*{GGUF_SUFFIX}"))
                if len(ggufs) > 1:
                    raise ValueError(f"{directory} holds several GGUF files ({', '.join(g.name for g in ggufs)}) and "
                                     f"no tokenizer.json or tokenizer.model; pick one with gguf_file=")
                if ggufs:
                    return cls.from_gguf(ggufs[0], name_or_path=str(path_or_hub_id))
                raise FileNotFoundError(f"no tokenizer in {directory}: looked for tokenizer.json (Hugging Face "
                                        f"tokenizers), tokenizer.model (sentencepiece, or Llama 3 tiktoken ranks) "
                                        f"and a {GGUF_SUFFIX} file")
            path = found[0]
        elif path.suffix == GGUF_SUFFIX or _is_gguf(path):
            return cls.from_gguf(path, name_or_path=str(path_or_hub_id))
        config = _read_config(directory)
        jinja_file = directory / "chat_template.jinja"
        template = (jinja_file.read_text(encoding="utf-8") if jinja_file.is_file()
                    else chat_template.pick_template(config.get("chat_template")))

        backend: Backend
        if path.suffix == ".json":
            backend = HFBackend(path, config)
        else:
            backend = TiktokenBackend(path) if tiktoken_llama3.looks_like_ranks_file(path) else SentencePieceBackend(path)
            # Without a tokenizer.json transformers takes BOS/EOS from tokenizer_config.json (with one, from the
            # file's post-processor only: HFBackend).
            for key, attr in (("add_bos_token", "add_bos"), ("add_eos_token", "add_eos")):
                if isinstance(config.get(key), bool):
                    setattr(backend, attr, config[key])
        logger.info("loaded %s tokenizer from %s: %d ids, chat template: %s", backend.kind, path,
                    backend.vocab_size, "from config" if template else "built-in")
        return cls(backend, template, config, str(path_or_hub_id))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, name_or_path: str | None = None) -> Tokenizer:
        """The tokenizer described by a GGUF file's metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""
        backend, template = gguf_vocab.load_gguf_backend(path)
        logger.info("loaded %s GGUF vocabulary from %s: %d ids, chat template: %s", backend.vocab.model, path,
                    backend.vocab_size, "from the file" if template else "built-in")
        return cls(backend, template, None, name_or_path if name_or_path is not None else str(path))

    # ---- vocabulary -------------------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """"sentencepiece", "tiktoken", "hf" or "gguf": which file format and library is underneath."""
        return self.backend.kind

    @property
    def vocab_size(self) -> int:
        """Number of ids including special tokens (Llama 3: 128256), i.e. max id + 1."""
        return self.backend.vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_id(self) -> int | None:
        return self.backend.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.backend.eos_id

    @property
    def pad_id(self) -> int | None:
        """The pad token; Llama tokenizers have none, so `<|finetune_right_pad_id|>` (Llama 3.1+) or EOS."""
        return self.backend.pad_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generation: EOS, and for Llama 3 also <|eot_id|> and <|eom_id|>."""
        return list(self.backend.stop_ids)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Text -> id of every special (control) token."""
        return dict(self.backend.special_tokens)

    @property
    def special_ids(self) -> frozenset[int]:
        return self._special_ids

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def token_to_id(self, token: str) -> int | None:
        """Id of a token given as its vocabulary string (e.g. "<|eot_id|>", "▁the"), or None."""
        return self.backend.token_to_id(token)

    # ---- encoding ---------------------------------------------------------------------------------------------

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode` adds BOS by default: what the tokenizer file says (a tokenizer.json post-processor, a
        GGUF's add_bos_token, tokenizer_config.json beside a tokenizer.model), as transformers and llama.cpp do."""
        return self.backend.add_bos

    @property
    def add_eos_token(self) -> bool:
        """Whether `encode` adds EOS by default (see `add_bos_token`)."""
        return self.backend.add_eos

    def encode(self, text: str, add_bos: bool | None = None, add_eos: bool | None = None,
               allow_special: bool = False) -> list[int]:
        """Token ids of `text`, with BOS / EOS where the tokenizer file asks for them (`add_bos_token`,
        `add_eos_token`) unless `add_bos` / `add_eos` say otherwise. Special-token text in it ("<|eot_id|>",
        "</s>") is encoded as ordinary text unless `allow_special`, so user input cannot inject control tokens."""
        return self._wrap(self.backend.encode(_check_text(text), allow_special), add_bos, add_eos)

    def _wrap(self, ids: list[int], add_bos: bool | None, add_eos: bool | None) -> list[int]:
        if add_bos if add_bos is not None else self.add_bos_token:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no BOS token; pass add_bos=False")
            ids = [self.bos_id, *ids]
        if add_eos if add_eos is not None else self.add_eos_token:
            if self.eos_id is None:
                raise ValueError("this tokenizer has no EOS token; pass add_eos=False")
            ids = [*ids, self.eos_id]
        return ids

    def __call__(self, text: str | Sequence[str], *, add_bos: bool | None = None, add_eos: bool | None = None,
                 allow_special: bool = False, padding: bool | str = True, padding_side: str = "left",
                 return_tensors: str | None = "pt") -> dict[str, Any]:
        """Encode a batch (or one string, as a batch of one) into `input_ids` and `attention_mask`; BOS / EOS as
        in `encode`.

        Padding (with `pad_id`) is on the left by default: batched generation appends to the right end of every
        row. Use `padding_side="right"` for training. `return_tensors="pt"` gives LongTensors [batch, seq];
        None gives lists.
        """
        texts = [text] if isinstance(text, str) else text
        if isinstance(texts, (bytes, Mapping)) or not isinstance(texts, Sequence):
            raise TypeError(f"text must be a str or a list of str, got {type(text).__name__}")
        if not texts:
            raise ValueError("cannot encode an empty batch")
        for k, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {k} of the batch must be a str, got {type(t).__name__}")
            check_unicode(t, f"text {k} of the batch")
        if padding not in (True, False, "longest", "do_not_pad"):
            raise ValueError(f"padding must be True/'longest' or False/'do_not_pad', got {padding!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")

        rows = [self._wrap(ids, add_bos, add_eos) for ids in self.backend.encode_batch(list(texts), allow_special)]
        masks = [[1] * len(r) for r in rows]
        if padding in (True, "longest"):
            if self.pad_id is None:
                raise ValueError("this tokenizer has no pad id (no pad, EOS or <|finetune_right_pad_id|> token)")
            width = max(map(len, rows))
            for k, row in enumerate(rows):
                fill = width - len(row)
                if padding_side == "left":
                    rows[k], masks[k] = [self.pad_id] * fill + row, [0] * fill + masks[k]
                else:
                    rows[k], masks[k] = row + [self.pad_id] * fill, masks[k] + [0] * fill
        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": masks}
        if len(set(map(len, rows))) > 1:
            raise ValueError("sequences have different lengths; pass padding=True to get tensors")
        return {"input_ids": torch.tensor(rows, dtype=torch.long), "attention_mask": torch.tensor(masks, dtype=torch.long)}

    # ---- decoding ---------------------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list of ints or a 1-D tensor). Ids outside the vocabulary raise ValueError."""
        return detokenize.decode(self.backend.byte_vocab, ids, skip_special_tokens)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming decoder: `.add(ids)` returns complete characters only, `.flush()` the rest at the end."""
        return IncrementalDecoder(self.backend.byte_vocab, skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = True, **template_kwargs: Any) -> list[int] | str:
        """A chat prompt from `[{"role": ..., "content": ...}, ...]`: ids, or the prompt text if not `tokenize`.

        With a Jinja chat template (tokenizer_config.json or chat_template.jinja) it is rendered as transformers
        does and encoded with special tokens recognised; `template_kwargs` go to the template. Without one,
        Llama 3 tokenizers use Meta's header format and the others Meta's Llama 2 `[INST]` format; there the
        message contents are encoded as ordinary text, so they cannot inject special tokens.
        """
        if self.chat_template is not None:
            text = chat_template.render_template(self.chat_template, messages, add_generation_prompt,
                                        self._template_tokens, **template_kwargs)
            return self.encode(text, add_bos=False, allow_special=True) if tokenize else text
        if template_kwargs:
            raise TypeError(f"{sorted(template_kwargs)}: extra arguments only apply to Jinja chat templates, and "
                            f"this tokenizer uses the built-in format")
        special = self.backend.special_tokens
        if all(n in special for n in chat_template.LLAMA3_HEADER_TOKENS):
            segments = chat_template.llama3_segments(messages, add_generation_prompt, special)
        elif self.bos_id is not None and self.eos_id is not None:
            segments = chat_template.llama2_segments(messages, self.bos_id, self.eos_id)
        else:
            raise ValueError("this tokenizer has no chat template and neither Llama 3 header tokens nor BOS/EOS "
                             "for the Llama 2 format")
        if not tokenize:
            return "".join(self._special_text[s] if isinstance(s, int) else s for s in segments)
        ids: list[int] = []
        for s in segments:
            if isinstance(s, int):
                ids.append(s)
            else:
                check_unicode(s, "a chat message")
                ids += self.backend.encode(s, allow_special=False)
        return ids

    # ---- saving -----------------------------------------------------------------------------------------------

    SAVED_FILES = SAVED_FILES  # what save_pretrained may write (model_io's saving reads it from the instance)

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write this tokenizer's files into `directory` (created if needed) so that `Tokenizer.from_pretrained`
        and transformers' `AutoTokenizer.from_pretrained` read it back with the same ids and chat template:
        a sentencepiece model as `tokenizer.model` + `tokenizer_config.json` + `special_tokens_map.json` (as
        transformers' LlamaTokenizer); anything else (tokenizer.json, Llama 3 tiktoken ranks, a GGUF vocabulary)
        as `tokenizer.json` + `tokenizer_config.json`, since transformers cannot read the other two itself.

        Each file is replaced atomically (concurrent writers serialise; a full disk is an OSError naming the
        file); tokenizer files left from an earlier save of another format are removed afterwards. To write a
        tokenizer together with weights in one step, use `model.save_pretrained(directory, tokenizer=self)`.
        """
        files = self.files_to_save()
        out = Path(directory).expanduser()
        written = []
        for name, data in files.items():
            with atomic_file(out / name) as tmp:
                tmp.write_bytes(data)
            written.append(out / name)
        for stale in sorted(SAVED_FILES - files.keys()):
            (out / stale).unlink(missing_ok=True)
        logger.info("saved %s tokenizer to %s (%s)", self.kind, out, ", ".join(files))
        return written

    def files_to_save(self) -> dict[str, bytes]:
        """File name -> content of what `save_pretrained` writes, built in memory."""
        b = self.backend
        if isinstance(b, SentencePieceBackend):
            return self._sentencepiece_files(b)
        if isinstance(b, HFBackend) and not isinstance(b, GGUFBackend):
            return {"tokenizer.json": b.tk.to_str(pretty=True).encode(), "tokenizer_config.json": json_bytes(
                self._saved_config(tokenizer_class="PreTrainedTokenizerFast", clean_up_tokenization_spaces=False))}
        if isinstance(b, (TiktokenBackend, GGUFBackend)):
            # Llama 3 ranks and GGUF vocabularies become a byte-level BPE tokenizer.json, as HF Llama 3 repos ship
            return gguf_vocab.hf_tokenizer_files(gguf_export.gguf_vocab_of(self))
        raise TypeError(f"cannot save a tokenizer with a {type(b).__name__} backend: llama_core writes "
                        "sentencepiece, tokenizer.json, Llama 3 tiktoken and GGUF tokenizers")

    def _sentencepiece_files(self, b: SentencePieceBackend) -> dict[str, bytes]:
        """tokenizer.json + tokenizer_config.json + special_tokens_map.json, and the model itself as tokenizer.model,
        as HF Llama 2 repos ship them. The tokenizer.json is what transformers reads: converting a bare
        tokenizer.model needs protobuf, and its conversion splits on spaces, so " a  b" gets other ids than from
        sentencepiece. Ours encodes as sentencepiece does (gguf_vocab.sentencepiece_json, tested)."""
        names = {key: b.sp.id_to_piece(i) for key, i in (("bos_token", b.bos_id), ("eos_token", b.eos_id),
                                                         ("unk_token", b.sp.unk_id()), ("pad_token", b.sp.pad_id()))
                 if i is not None and i >= 0}
        try:
            files = gguf_vocab.hf_tokenizer_files(gguf_export.gguf_vocab_of(self))
        except ValueError as e:  # a unigram or normalizing model has no tokenizer.json form of ours
            raise ValueError(f"cannot save {self.name_or_path or 'this tokenizer'} in a form transformers reads "
                             f"with the same ids: {e}") from e
        config = {**self._config, **json.loads(files["tokenizer_config.json"])}
        return {"tokenizer.model": b.sp.serialized_model_proto(), "tokenizer.json": files["tokenizer.json"],
                "tokenizer_config.json": json_bytes(config), "special_tokens_map.json": json_bytes(names)}

    def _saved_config(self, **defaults: Any) -> dict[str, Any]:
        """tokenizer_config.json: the one read (its other keys kept) with `defaults` where it had none, and
        this tokenizer's current chat template; a list of named templates stays as it was if unchanged."""
        config = {**defaults, **self._config}
        for key in ("add_bos_token", "add_eos_token"):
            if key in defaults:  # what the backend does now wins over a stale value in the file
                config[key] = defaults[key]
        if chat_template.pick_template(self._config.get("chat_template")) != self.chat_template:
            config["chat_template"] = self.chat_template
        if config.get("chat_template") is None:
            config.pop("chat_template", None)
        return config

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, name_or_path={self.name_or_path!r})"
