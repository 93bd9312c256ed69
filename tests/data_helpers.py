"""Builders of tiny, offline test data: documents, a sentencepiece model, a Hugging Face
tokenizer.json, JSONL/text corpora, a TFDS dataset in array_record format (no TensorFlow, no
network) and prepared source directories. Every builder writes into a directory the test owns.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence

import numpy as np

WORDS = [
    "the", "model", "reads", "data", "and", "learns", "to", "predict", "the", "next", "token", "from",
    "every", "document", "it", "sees", "continued", "pretraining", "starts", "from", "a", "checkpoint",
    "with", "a", "small", "learning", "rate", "and", "new", "text", "numbers", "like", "42", "and",
    "2024", "appear,", "as", "do", "punctuation", "marks:", "commas,", "periods;", "and", "quotes",
]
# Text a tokenizer must round-trip: accents, CJK, emoji, tabs, several spaces, newlines.
ODD_TEXTS = ("café naïve déjà vu", "日本語のテキスト", "emoji 🙂 here", "tabs\tand  two  spaces",
             "line one\nline two\n\nafter a blank line")


def make_documents(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """n deterministic synthetic documents of varied length, some with unusual characters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if i % 7 == 3:
            words.insert(rng.randrange(len(words)), ODD_TEXTS[i % len(ODD_TEXTS)])
        docs.append(f"doc {i}: " + " ".join(words))
    return docs


def write_jsonl(path: str | os.PathLike, docs: Sequence[str], field: str = "text") -> str:
    """One JSON object per line, the document under `field` (plus an id field)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"id": i, field: doc}, ensure_ascii=False) + "\n")
    return path


def write_text_files(directory: str | os.PathLike, docs: Sequence[str]) -> list[str]:
    """One file per document, doc-00000.txt, ... (sorted names follow the document order)."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, doc in enumerate(docs):
        path = os.path.join(directory, f"doc-{i:05d}.txt")
        with open(path, "w", encoding="utf-8", newline="") as f:
            f.write(doc)
        paths.append(path)
    return paths


def make_sentencepiece(directory: str | os.PathLike, vocab_size: int = 320, docs: Sequence[str] | None = None,
                       name: str = "tok.model") -> str:
    """Train a small sentencepiece model (byte fallback, ids unk 0 / bos 1 / eos 2 / pad 3).

    With the default documents any vocab_size from 300 to 350 works: byte fallback needs 260 ids,
    and the coverage of 0.995 leaves the rare characters (accents, CJK, emoji) to bytes.
    """
    from cpt_jax.data.tokenization import train_sentencepiece

    docs = list(docs) if docs is not None else make_documents(300, seed=1) + list(ODD_TEXTS)
    path = os.path.join(os.fspath(directory), name)
    train_sentencepiece(docs, path, vocab_size, character_coverage=0.995, num_threads=1)
    return path


def make_hf_tokenizer(directory: str | os.PathLike, vocab_size: int = 500, docs: Sequence[str] | None = None,
                      eos: str | None = "<|endoftext|>", extra_special: Sequence[str] = (),
                      config: dict | None = None, template_bos: str | None = None) -> str:
    """Train a byte-level BPE (GPT-2 style, exact round trip) and save tokenizer.json in `directory`.

    `eos` None builds a tokenizer without any end-of-text token; `config` writes a
    tokenizer_config.json beside it; `template_bos` (one of the special tokens) gives it Llama 3's
    post-processor: ByteLevel, then a template that starts every text with that token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    docs = list(docs) if docs is not None else make_documents(300, seed=2) + list(ODD_TEXTS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ([eos] if eos else []) + list(extra_special)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer)
    if template_bos is not None:
        special_tokens = [(template_bos, tok.token_to_id(template_bos))]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{template_bos} $A", pair=f"{template_bos} $A {template_bos} $B:1",
                                          special_tokens=special_tokens)])
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    if config is not None:
        with open(os.path.join(directory, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f)
    return path


def make_wordlevel_tokenizer(directory: str | os.PathLike, docs: Sequence[str], vocab_size: int = 70_000,
                             eos: str = "</s>") -> str:
    """A Hugging Face WordLevel tokenizer.json over the whitespace-separated words of `docs`, padded
    with filler words to `vocab_size` ids, the real words given the HIGHEST ids (so a vocabulary
    above 65536 really needs uint32). Round trip is exact for single-spaced one-line documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = sorted({w for doc in docs for w in doc.split()})
    first = vocab_size - len(words) - 2
    vocab = {f"filler{i}": i for i in range(first)}
    vocab["<unk>"] = first
    vocab[eos] = first + 1
    vocab.update({w: first + 2 + i for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with single spaces
    tok.add_special_tokens([eos])
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "tokenizer.json")
    tok.save(path)
    return path


def make_tfds_dataset(data_dir: str | os.PathLike, splits: dict[str, Sequence[str]],
                      name: str = "cpt_tiny_text", feature: str = "text") -> str:
    """Prepare a TFDS dataset `name` with a Text feature in array_record format under `data_dir`.

    Uses a GeneratorBasedBuilder: no TensorFlow and no network are needed. Returns the dataset's
    version directory. Records come back from TFDS in its own (hashed-key) order, not `splits` order.
    """
    import tensorflow_datasets as tfds

    dataset_name = name

    # skip_registration: tests may build several datasets with the same name in one process.
    with tfds.core.registered.skip_registration():

        class Builder(tfds.core.GeneratorBasedBuilder):
            name = dataset_name
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                    {feature: tfds.features.Text(), "index": tfds.features.Scalar(dtype=np.int32)}))

            def _split_generators(self, dl_manager):
                return {split: self._generate_examples(docs) for split, docs in splits.items()}

            def _generate_examples(self, docs):
                for i, doc in enumerate(docs):
                    yield i, {feature: doc, "index": i}

    builder = Builder(data_dir=os.fspath(data_dir), file_format="array_record")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.path.join(os.fspath(data_dir), name, "1.0.0")


def tfds_documents_in_order(data_dir: str | os.PathLike, name: str = "cpt_tiny_text", split: str = "train",
                            feature: str = "text") -> list[str]:
    """The documents of a prepared TFDS split in the order TFDS (and so prepare) reads them."""
    import tensorflow_datasets as tfds

    ds = tfds.builder_from_directory(os.path.join(os.fspath(data_dir), name, "1.0.0")).as_data_source(split=split)
    return [ds[i][feature].decode("utf-8") for i in range(len(ds))]


def make_prepared_source(directory: str | os.PathLike, tokenizer: str, docs: Sequence[str] | None = None,
                         seq_len: int = 16, val_examples: int = 2, name: str = "src", **kwargs) -> str:
    """Run prepare on a JSONL corpus of `docs` (default 200 synthetic documents); returns the
    prepared directory `directory/name`."""
    from cpt_jax.data.packing import prepare

    directory = os.fspath(directory)
    docs = list(docs) if docs is not None else make_documents(200, seed=3)
    corpus = write_jsonl(os.path.join(directory, f"{name}-corpus", "data.jsonl"), docs)
    out = os.path.join(directory, name)
    prepare([f"jsonl:{corpus}"], tokenizer, seq_len, out, val_examples, name=name, **kwargs)
    return out


def write_synthetic_source(directory: str | os.PathLike, name: str, num_examples: int, seq_len: int,
                           vocab_size: int = 1000, eos_id: int = 2, val_examples: int = 1,
                           examples_per_shard: int = 7, fingerprint: str = "0" * 64) -> str:
    """A prepared directory without a tokenizer: example i (train, then val) holds the tokens
    (i * (seq_len + 1) + j) % vocab_size, j = 0..seq_len, so a test can tell which example it read
    from its first token. Same files and manifest keys as prepare writes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from cpt_jax.data.packing import FORMAT_VERSION, MANIFEST, RECORD_OPTIONS, VAL_FILE, shard_name
    from cpt_jax.data.tokenization import token_dtype

    out = os.path.join(os.fspath(directory), name)
    os.makedirs(out)
    length = seq_len + 1
    dtype = token_dtype(vocab_size).newbyteorder("<")
    total = num_examples + val_examples
    rows = (np.arange(total * length, dtype=np.int64).reshape(total, length) % vocab_size).astype(dtype)
    n_shards = max(1, -(-num_examples // examples_per_shard))
    shards, sizes = [], []
    for s in range(n_shards):
        shards.append(shard_name(s, n_shards))
        part = rows[s * examples_per_shard:min((s + 1) * examples_per_shard, num_examples)]
        sizes.append(len(part))
        writer = ArrayRecordWriter(os.path.join(out, shards[-1]), RECORD_OPTIONS)
        for row in part:
            writer.write(row.tobytes())
        writer.close()
    writer = ArrayRecordWriter(os.path.join(out, VAL_FILE), RECORD_OPTIONS)
    for row in rows[num_examples:]:
        writer.write(row.tobytes())
    writer.close()
    manifest = {
        "format_version": FORMAT_VERSION, "name": name, "inputs": ["synthetic"], "tokenizer_kind": "none",
        "tokenizer_path": "", "tokenizer_fingerprint": fingerprint, "vocab_size": vocab_size, "bos_id": None,
        "eos_id": eos_id, "pad_id": eos_id, "seq_len": seq_len, "example_length": length,
        "dtype": token_dtype(vocab_size).name, "byte_order": "little", "examples": num_examples,
        "val_examples": val_examples, "tokens": num_examples * length, "val_tokens": val_examples * length,
        "documents": total, "empty_documents": 0, "document_tokens": total * length, "dropped_tokens": 0,
        "text_bytes": 4 * total * length, "bytes_per_token": 4.0, "shards": shards, "shard_examples": sizes,
        "val_file": VAL_FILE, "skipped_records": 0, "record_options": RECORD_OPTIONS, "created": "",
    }
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    return out


def reference_segments(tokens: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """The plain statement of document segments, the oracle of the library's faster one: segment
    ids count (from 1) the segment starts so far, at position 0 and after every EOS; a position is
    the distance to the segment's start. tokens [..., L] -> two int32 arrays [..., L]."""
    tokens = np.asarray(tokens)
    starts = np.zeros(tokens.shape, bool)
    starts[..., 0] = True
    starts[..., 1:] = tokens[..., :-1] == eos_id
    segment_ids = np.cumsum(starts, axis=-1, dtype=np.int32)
    index = np.broadcast_to(np.arange(tokens.shape[-1], dtype=np.int32), tokens.shape)
    start_of_segment = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return segment_ids, (index - start_of_segment).astype(np.int32)


def failing_process_task(task, *args):
    """Stand-in for `cpt_jax.data.packing._process_task` that fails on a JSONL block starting past
    line 40. It lives in an importable module so that spawned worker processes (which re-import
    functions by name) run it: a test patches it in to make a real worker process raise."""
    from cpt_jax.data import packing

    if task[0] == "jsonl" and task[2] > 40:
        raise RuntimeError("worker died")
    return packing._process_task(task, *args)
