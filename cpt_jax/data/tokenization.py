"""One tokenizer interface over two backends: sentencepiece `.model` files and Hugging Face
`tokenizer.json` files (the `tokenizers` package; Llama 3, Qwen, Mistral, ...).

`load_tokenizer(path)` picks the backend from the file's content, so a renamed file still loads.
Every tokenizer carries a fingerprint (sha256 of the file) that prepared data and checkpoints record,
so a run can refuse data made with another tokenizer. `train_sentencepiece` trains a new
sentencepiece model in-process for users with a new domain (`python -m cpt_jax.tokenizer train`).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import io
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np

from cpt_jax.config import ConfigError, first_line

# Special tokens searched, in order, when a tokenizer.json comes without a tokenizer_config.json
# that names them. End-of-document tokens of base models come first: an instruct model's
# end-of-turn token (<|eot_id|>, <|im_end|>) would be the wrong document separator for pretraining.
EOS_CANDIDATES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>", "<|eos|>")
BOS_CANDIDATES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>", "<|bos|>")
PAD_CANDIDATES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
BOS_CHOICES = ("auto", "always", "never")
SENTENCEPIECE_MODEL_TYPES = ("unigram", "bpe", "char", "word")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of a vocabulary of `vocab_size` tokens."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file's bytes (the tokenizer fingerprint)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclasses.dataclass(eq=False)
class Tokenizer(abc.ABC):
    """Common interface of both backends; `kind` is 'sentencepiece' or 'huggingface'."""

    kind: ClassVar[str] = ""
    path: str  # absolute path of the tokenizer file
    fingerprint: str  # sha256 hex digest of the tokenizer file
    vocab_size: int  # number of ids (largest id + 1), the rows an embedding needs at least
    bos_id: int | None  # None when the tokenizer has none
    eos_id: int  # the end of a document: `prepare` appends it after every document
    pad_id: int  # the eos id when the tokenizer defines no pad token
    # Whether the tokenizer itself starts every text with BOS (its models were trained on documents
    # that begin with it): what `prepare --bos auto` follows.
    adds_bos: bool = False

    @property
    def dtype(self) -> np.dtype:
        """dtype of prepared examples made with this tokenizer (uint16 when the vocab fits)."""
        return token_dtype(self.vocab_size)

    @abc.abstractmethod
    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[np.ndarray]:
        """Token ids of each text (int32 arrays), without bos/eos. `num_threads` None: all cores."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """The text of a sequence of ids (special tokens are kept in the text)."""

    def encode_documents(self, texts: Sequence[str], num_threads: int | None = None,
                         add_bos: bool = False) -> np.ndarray:
        """All texts encoded and concatenated, each followed by eos (and preceded by bos with
        `add_bos`), as one array of `self.dtype`: what `prepare` packs, made by one concatenation and
        one vectorised insert instead of a Python-level append per document."""
        if not texts:
            return np.empty(0, self.dtype)
        arrays = self.encode_batch(texts, num_threads=num_threads)
        lengths = np.fromiter((a.size for a in arrays), np.int64, count=len(arrays))
        flat = np.concatenate(arrays).astype(self.dtype, copy=False)
        ends = np.cumsum(lengths)
        if not add_bos:
            return np.insert(flat, ends, np.asarray(self.eos_id, self.dtype))
        # (start, end) of every document in order; np.insert keeps equal positions in this order.
        where = np.stack([ends - lengths, ends], axis=1).reshape(-1)
        marks = np.tile(np.asarray([self.bos_id, self.eos_id], self.dtype), len(arrays))
        return np.insert(flat, where, marks)


def _threads(num_threads: int | None) -> int:
    return max(1, num_threads if num_threads is not None else (os.cpu_count() or 1))


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file."""

    kind = "sentencepiece"

    def __init__(self, path: str, data: bytes, fingerprint: str):
        import sentencepiece as spm

        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with a multi-line text
            raise ConfigError(f"tokenizer {path}: not a sentencepiece model or tokenizer.json "
                              f"({first_line(e)})") from None
        self._sp = sp
        eos = sp.eos_id()
        if eos < 0:
            raise ConfigError(f"tokenizer {path}: the sentencepiece model defines no eos piece, expected one "
                              "(train it with eos_id >= 0)")
        bos = sp.bos_id()
        pad = sp.pad_id()
        # Llama 2's convention: a sentencepiece model with a BOS piece starts every text with it.
        super().__init__(path, fingerprint, sp.vocab_size(), bos if bos >= 0 else None, eos,
                         pad if pad >= 0 else eos, adds_bos=bos >= 0)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[np.ndarray]:
        return self._sp.encode(list(texts), num_threads=_threads(num_threads), return_type="numpy",
                               add_bos=False, add_eos=False)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (with an optional `tokenizer_config.json` beside it)."""

    kind = "huggingface"

    def __init__(self, path: str, data: bytes, fingerprint: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_buffer(data)
        except Exception as e:  # the Rust side raises plain Exception with a serde message
            raise ConfigError(f"tokenizer {path}: not a sentencepiece model or tokenizer.json "
                              f"({first_line(e)})") from None
        # A tokenizer.json may carry padding/truncation settings for fine-tuning; documents must be
        # encoded whole.
        tok.no_padding()
        tok.no_truncation()
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        vocab_size = max(max(vocab.values(), default=-1) + 1, tok.get_vocab_size(with_added_tokens=True))
        named, config_says = _config_tokens(path)
        eos = self._special_id("eos", named, EOS_CANDIDATES, path)
        if eos is None:
            raise ConfigError(
                f"tokenizer {path}: no end-of-text token found (looked for {', '.join(EOS_CANDIDATES)} and "
                "eos_token in tokenizer_config.json), expected one; add a tokenizer_config.json naming eos_token")
        bos = self._special_id("bos", named, BOS_CANDIDATES, path)
        pad = self._special_id("pad", named, PAD_CANDIDATES, path)
        # tokenizer_config.json's add_bos_token when it says (transformers honours it over the
        # template), else what the post-processor's template does (Llama 3 and Mistral start with
        # BOS; Qwen2 has no BOS).
        if config_says is None:
            ids = tok.encode("a", add_special_tokens=True).ids
            config_says = bos is not None and bool(ids) and ids[0] == bos
        super().__init__(path, fingerprint, vocab_size, bos, eos, eos if pad is None else pad,
                         adds_bos=bool(config_says) and bos is not None)

    def _special_id(self, which: str, named: dict[str, str | None], candidates: Sequence[str],
                    path: str) -> int | None:
        content = named.get(which)
        if which in named and content is None and which != "eos":
            return None  # tokenizer_config.json says explicitly that there is none
        if content is not None:
            token_id = self._tok.token_to_id(content)
            if token_id is None:
                config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
                raise ConfigError(f"{config}: {which}_token {content!r} is not in the vocabulary of {path}, "
                                  "expected a token of the tokenizer")
            return token_id
        return next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)

    def encode_batch(self, texts: Sequence[str], num_threads: int | None = None) -> list[np.ndarray]:
        # `tokenizers` parallelises over its own Rust thread pool (RAYON_NUM_THREADS) and has no
        # per-call thread count, so num_threads is not used here.
        del num_threads
        return [np.asarray(e.ids, np.int32) for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)


def _config_tokens(path: str) -> tuple[dict[str, str | None], bool | None]:
    """({'eos': content, ...} for the special tokens a tokenizer_config.json beside `path` names,
    its add_bos_token or None when it does not say); ({}, None) without one."""
    config = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    if not os.path.exists(config):
        return {}, None
    try:
        with open(config, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{config}: unreadable ({first_line(e)}), expected a JSON object") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{config}: a JSON {type(cfg).__name__}, expected a JSON object")
    named: dict[str, str | None] = {}
    for which in ("eos", "bos", "pad"):
        key = f"{which}_token"
        if key not in cfg:
            continue
        value = cfg[key]
        if isinstance(value, dict):  # AddedToken serialised as {"content": ..., "special": ...}
            value = value.get("content")
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{config}: {key} is {value!r}, expected a token string")
        named[which] = value
    add_bos = cfg.get("add_bos_token")
    if add_bos is not None and not isinstance(add_bos, bool):
        raise ConfigError(f"{config}: add_bos_token is {add_bos!r}, expected true or false")
    return named, add_bos


def resolve_tokenizer_path(path: str | os.PathLike) -> str:
    """The tokenizer file `path` names: the file itself, or tokenizer.json / tokenizer.model inside a
    directory (a Hugging Face model directory). ConfigError when there is none."""
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        for candidate in ("tokenizer.json", "tokenizer.model"):
            if os.path.isfile(os.path.join(path, candidate)):
                return os.path.join(path, candidate)
        raise ConfigError(f"tokenizer {path}: a directory without tokenizer.json or tokenizer.model, expected a "
                          "tokenizer file")
    if not os.path.exists(path):
        raise ConfigError(f"tokenizer {path}: no such file, expected a sentencepiece .model or tokenizer.json")
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a sentencepiece model or a Hugging Face tokenizer.json (or a directory holding one), by
    content: JSON is a Hugging Face tokenizer, anything else is tried as a sentencepiece model proto.
    ConfigError when the file is missing, is not a tokenizer or defines no end-of-text token."""
    path = resolve_tokenizer_path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"tokenizer {path}: unreadable ({e.strerror}), expected a tokenizer file") from None
    fingerprint = hashlib.sha256(data).hexdigest()
    if data.lstrip()[:1] == b"{":
        return HuggingFaceTokenizer(path, data, fingerprint)
    return SentencePieceTokenizer(path, data, fingerprint)


# Longest sentence (in characters) handed to the sentencepiece trainer; sentencepiece silently skips
# sentences longer than its max_sentence_length (bytes), so long lines are cut instead of lost.
_MAX_SENTENCE_CHARS = 4096


def _sentences(documents: Iterable[str], max_sentences: int, errors: list[Exception]) -> Iterator[str]:
    """The non-blank lines of the documents for the sentencepiece trainer (at least one, at most
    `max_sentences`). An exception raised while reading the documents (a bad record) must not cross
    sentencepiece's C++ frames: it ends the iteration and is kept in `errors`, re-raised once the
    trainer returns."""
    lines = (line for doc in documents for line in filter(str.strip, doc.splitlines()))
    pieces = (line[i:i + _MAX_SENTENCE_CHARS] for line in lines for i in range(0, len(line), _MAX_SENTENCE_CHARS))
    try:
        yield from itertools.islice(pieces, max(1, max_sentences))
    except Exception as e:
        errors.append(e)


def train_sentencepiece(documents: Iterable[str], out: str | os.PathLike, vocab_size: int, *,
                        model_type: str = "unigram", character_coverage: float = 0.9995,
                        byte_fallback: bool = True, max_sentences: int = 10_000_000,
                        num_threads: int | None = None, quiet: bool = True) -> Tokenizer:
    """Train a sentencepiece model on `documents` in-process and write it to `out`.

    Ids: unk 0, bos 1, eos 2, pad 3. Text is kept as is (identity normalisation, whitespace kept)
    so that decode(encode(text)) == text for prepared data; digits are split; byte fallback (on by
    default) encodes characters outside the vocabulary as bytes instead of unk. Documents are split
    into lines, the trainer's unit; at most `max_sentences` lines are read. `out` must not exist.
    """
    import sentencepiece as spm

    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out):
        raise ConfigError(f"--out {out}: already exists, expected a new path (delete it or choose another)")
    if vocab_size < 8:
        raise ConfigError(f"--vocab_size: {vocab_size}, expected at least 8")
    if model_type not in SENTENCEPIECE_MODEL_TYPES:
        raise ConfigError(f"--model_type: {model_type!r}, expected unigram, bpe, char or word")
    if not 0.0 < character_coverage <= 1.0:
        raise ConfigError(f"--character_coverage: {character_coverage}, expected a value in (0, 1]")
    model = io.BytesIO()
    errors: list[Exception] = []
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(documents, max_sentences, errors),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            character_coverage=character_coverage,
            byte_fallback=byte_fallback,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            max_sentence_length=_MAX_SENTENCE_CHARS * 4,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=True,
            num_threads=_threads(num_threads),
            minloglevel=2 if quiet else 0,
        )
    except RuntimeError as e:
        if errors:
            raise errors[0] from None
        # sentencepiece's own diagnostics (vocabulary too small for the characters and byte pieces,
        # too large for the corpus, empty corpus) are user errors.
        raise ConfigError(f"sentencepiece training: {first_line(e)}") from None
    if errors:
        raise errors[0]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)
    return load_tokenizer(out)


def describe(tok: Tokenizer) -> dict[str, Any]:
    """The tokenizer facts that prepared data and checkpoints record."""
    return {
        "tokenizer_kind": tok.kind,
        "tokenizer_path": tok.path,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "bos_id": tok.bos_id,
        "adds_bos": tok.adds_bos,
        "eos_id": tok.eos_id,
        "pad_id": tok.pad_id,
    }


def resolve_bos(choice: str, tok: Tokenizer) -> bool:
    """Whether documents start with BOS for `--bos` auto (the tokenizer's own convention), always
    or never. ConfigError for an unknown choice or 'always' without a BOS to add."""
    if choice not in BOS_CHOICES:
        raise ConfigError(f"--bos: {choice!r}, expected one of {', '.join(BOS_CHOICES)}")
    if choice == "always" and tok.bos_id is None:
        raise ConfigError(f"--bos always: tokenizer {tok.path} has no BOS token, expected one (use --bos auto or "
                          "never)")
    if choice == "always" and tok.bos_id == tok.eos_id:
        raise ConfigError(f"--bos always: tokenizer {tok.path}'s BOS is its EOS (id {tok.eos_id}), which already "
                          "separates the documents; expected --bos auto or never")
    # A BOS that is also the EOS would end a document where it starts: the EOS before it serves.
    return choice == "always" or (choice == "auto" and tok.adds_bos and tok.bos_id != tok.eos_id)

