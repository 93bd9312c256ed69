"""Hugging Face interop: import safetensors checkpoints, export them back, compare logits.

    python -m cpt_jax.hf import --model_dir HF_DIR --out CKPT_DIR [--lr_min X] [--lr_max Y]
    python -m cpt_jax.hf export --checkpoint DIR --out HF_DIR [--dtype float32|bfloat16|float16]
    python -m cpt_jax.hf check  --model_dir HF_DIR --checkpoint DIR [--atol 1e-4]

Supported architectures (cpt_jax/hf_arch.py): LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM,
Qwen3ForCausalLM, Olmo2ForCausalLM and NemotronForCausalLM (GQA, tied or untied embeddings, rope_theta,
linear and Llama-3 rope scaling), with config.json as transformers 4.x (`rope_theta`/`rope_scaling`)
or 5.x (`rope_parameters`) writes it.

Import writes a cpt_jax checkpoint with the layout of a training run's (CKPT_DIR/checkpoints/0/
with items `params` and `metadata`; there is no optimizer state to carry over) plus the model's
tokenizer files under CKPT_DIR/tokenizer/. Its metadata carries the model config, the parameter
shapes and the pretraining schedule's lr_min/lr_max, so `init_from=CKPT_DIR` starts the recipe at
the right learning rate (see configs/cpt_hf.py). Parameters are stored in float32 (the trainer's
master-weight dtype); bf16 and fp16 values are exactly representable there, which is what makes
import followed by export bit-identical. The dtype the weights came in is recorded
(`source_dtype`) and export writes that dtype unless told otherwise.

Tensors are read one at a time from the safetensors files into preallocated stacked arrays, so the
host holds the output plus one tensor, never two copies of the model. Every user error (config,
index, tensor shapes from the safetensors headers, tokenizer, output directory) is found before
anything is written and reported as one line; the output is built in a temporary directory next
to --out and renamed into place at the end.

transformers and torch are imported only by the `check` command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import ml_dtypes
import numpy as np

from cpt_jax import checkpoint, model
from cpt_jax.config import ConfigError, first_line
from cpt_jax.data.tokenization import Tokenizer, file_sha256, load_tokenizer, resolve_tokenizer_path
from cpt_jax.hf_arch import (
    TensorSpec,
    architecture_for,
    architecture_of,
    hf_config_for,
    ignorable,
    model_config_from_hf,
    tensor_specs,
)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied with the model on import and export; the first two are the tokenizer proper.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers calls "5GB"
_ST_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16)}
_ST_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
EXPORT_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# ============================================================================ published schedules


@dataclasses.dataclass(frozen=True)
class PublishedSchedule:
    """The learning rates a model family was pretrained with, as its paper states them."""

    name: str
    lr_max: float
    lr_min: float
    reference: str
    match: tuple[tuple[str, Any], ...]  # config.json fields that identify the model


def _llama_shape(hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int) -> tuple:
    return (
        ("model_type", "llama"), ("hidden_size", hidden), ("num_hidden_layers", layers),
        ("num_attention_heads", heads), ("num_key_value_heads", kv_heads), ("intermediate_size", ffn),
        ("vocab_size", vocab),
    )


_LLAMA1 = "Touvron et al. 2023, LLaMA: Open and Efficient Foundation Language Models, Table 2 and Sec. 2.2"
_LLAMA2 = "Touvron et al. 2023, Llama 2: Open Foundation and Fine-Tuned Chat Models, Table 1 and Sec. 2.2"
_LLAMA3 = "Llama Team 2024, The Llama 3 Herd of Models, Sec. 3.4.1"
_TINYLLAMA = "Zhang et al. 2024, TinyLlama: An Open-Source Small Language Model, Sec. 2.3"

# Only schedules a paper states. LLaMA 1 and Llama 2 decay a cosine to 10% of the peak (3.0e-4 at
# 7B/13B, 1.5e-4 at 33B/65B/70B); LLaMA 1 and Llama 2 7B/13B share their shapes and their numbers.
# Llama 3.1 405B: peak 8e-5, cosine to 8e-7 (the paper then anneals linearly to 0 over the last
# 40M tokens; the recipe restarts from the cosine floor, the schedule's own final LR). TinyLlama:
# cosine from 4.0e-4 to 4.0e-5. Not listed: Llama 3/3.1 8B and 70B, Mistral and Qwen2, whose
# reports give no pretraining learning rates; pass --lr_min for those.
PUBLISHED_SCHEDULES: tuple[PublishedSchedule, ...] = (
    PublishedSchedule("LLaMA 1 / Llama 2 7B", 3.0e-4, 3.0e-5, f"{_LLAMA1}; {_LLAMA2}",
                      _llama_shape(4096, 32, 32, 32, 11008, 32000)),
    PublishedSchedule("LLaMA 1 / Llama 2 13B", 3.0e-4, 3.0e-5, f"{_LLAMA1}; {_LLAMA2}",
                      _llama_shape(5120, 40, 40, 40, 13824, 32000)),
    PublishedSchedule("LLaMA 1 33B", 1.5e-4, 1.5e-5, _LLAMA1, _llama_shape(6656, 60, 52, 52, 17920, 32000)),
    PublishedSchedule("LLaMA 1 65B", 1.5e-4, 1.5e-5, _LLAMA1, _llama_shape(8192, 80, 64, 64, 22016, 32000)),
    PublishedSchedule("Llama 2 70B", 1.5e-4, 1.5e-5, _LLAMA2, _llama_shape(8192, 80, 64, 8, 28672, 32000)),
    PublishedSchedule("Llama 3.1 405B", 8e-5, 8e-7, _LLAMA3, _llama_shape(16384, 126, 128, 8, 53248, 128256)),
    PublishedSchedule("TinyLlama 1.1B", 4.0e-4, 4.0e-5, _TINYLLAMA, _llama_shape(2048, 22, 32, 4, 5632, 32000)),
)


def published_schedule(hf_config: dict[str, Any]) -> PublishedSchedule | None:
    """The published schedule of the model a config.json describes, or None when none is known."""
    fields = dict(hf_config)
    fields.setdefault("num_key_value_heads", fields.get("num_attention_heads"))
    for entry in PUBLISHED_SCHEDULES:
        if all(fields.get(key) == value for key, value in entry.match):
            return entry
    return None


# ============================================================================ reading files


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({first_line(e)}), expected {what}") from None


# ============================================================================ reading safetensors


class _Shard:
    """One safetensors file: its tensor table from the header, and reads of one tensor at a time.

    The file is opened only while it is read: an open safe_open handle maps the whole file, and its
    pages would count against the host's memory until closed.
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        try:
            with safe_open(path, framework="np") as f:
                self.tensors = {}
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(name)
                    self.tensors[name] = (s.get_dtype(), tuple(s.get_shape()))
        except Exception as e:  # safetensors raises its own SafetensorError for a bad header
            raise ConfigError(f"{path}: not a readable safetensors file ({first_line(e)}), expected the "
                              "weights written by save_pretrained") from None

    def read(self, names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) for each of `names`, one array alive at a time."""
        from safetensors import safe_open

        with safe_open(self.path, framework="np") as f:
            for name in names:
                try:
                    array = f.get_tensor(name)
                except TypeError:
                    if self.tensors[name][0] != "BF16":
                        raise
                    array = self._read_bf16(name)
                yield name, array
                del array

    def _read_bf16(self, name: str) -> np.ndarray:
        # numpy has no native bfloat16, so safetensors' numpy backend cannot build the array: read
        # the bytes at the header's offsets and view them as ml_dtypes.bfloat16 (little-endian on disk).
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            info = json.loads(f.read(n))[name]
            begin, end = info["data_offsets"]
            raw = np.empty((end - begin) // 2, np.uint16)
            f.seek(8 + n + begin)
            if f.readinto(memoryview(raw).cast("B")) != end - begin:
                raise ConfigError(f"{self.path}: tensor {name} is truncated, expected {end - begin} bytes")
        if sys.byteorder != "little":
            raw = raw.byteswap()
        return raw.view(ml_dtypes.bfloat16).reshape(info["shape"])


def _pickle_files(model_dir: str) -> list[str]:
    return sorted(n for n in os.listdir(model_dir) if n.endswith(PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))


def _weight_files(model_dir: str) -> tuple[dict[str, str], dict[str, _Shard]]:
    """({tensor name: file name}, {file name: shard}) from the index or the single file; validated."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        index = _read_json(index_path, "a safetensors index with a weight_map")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ConfigError(f"{index_path}: no weight_map of tensor names to files, expected one")
        shards: dict[str, _Shard] = {}
        for file in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, file)
            if os.path.basename(file) != file or not os.path.isfile(path):
                count = sum(1 for v in weight_map.values() if v == file)
                raise ConfigError(f"{index_path}: shard {file} ({count} tensors) is missing from {model_dir}, "
                                  "expected every shard the index names")
            shards[file] = _Shard(path)
        for name, file in weight_map.items():
            if name not in shards[file].tensors:
                raise ConfigError(f"{index_path}: tensor {name} is mapped to {file}, which does not hold it, "
                                  "expected the index to match the shards")
        return dict(weight_map), shards
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        shard = _Shard(single)
        return {name: SINGLE_FILE for name in shard.tensors}, {SINGLE_FILE: shard}
    pickles = _pickle_files(model_dir)
    if pickles:
        raise ConfigError(
            f"{model_dir}: only pickle-based weights ({', '.join(pickles[:3])}), which cpt_jax refuses to load "
            "(unpickling can run code), expected safetensors; convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
        )
    raise ConfigError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}, expected safetensors weights")


# ============================================================================ import


@dataclasses.dataclass
class _ImportPlan:
    """Everything validated before the first byte is written."""

    model_dir: str
    out_dir: str
    architecture: str
    hf_config: dict[str, Any]
    generation_config: dict[str, Any] | None
    model_config: model.ModelConfig
    specs: list[TensorSpec]
    weight_map: dict[str, str]
    shards: dict[str, _Shard]
    source_dtype: str
    tokenizer: Tokenizer | None
    tokenizer_files: list[str]
    schedule: dict[str, Any]


def _check_out_dir(out_dir: str, flag: str = "--out") -> str:
    out = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"{flag} {out}: exists and is not an empty directory, expected a new or empty directory")
    return out


def _schedule(hf_config: dict[str, Any], architecture: str, lr_min: float | None,
              lr_max: float | None) -> dict[str, Any]:
    for flag, value in (("--lr_min", lr_min), ("--lr_max", lr_max)):
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{flag}: {value}, expected a positive learning rate")
    known = published_schedule(hf_config)
    if lr_min is not None:
        source, reference = "flags", None
        if lr_max is None and known is not None:
            lr_max = known.lr_max
    elif known is not None:
        source, reference, lr_min = "table", f"{known.name}: {known.reference}", known.lr_min
        lr_max = known.lr_max if lr_max is None else lr_max
    else:
        raise ConfigError(
            f"--lr_min: missing, and no published schedule is known for this {architecture} (hidden_size "
            f"{hf_config.get('hidden_size')}, {hf_config.get('num_hidden_layers')} layers), expected --lr_min X "
            "(the final learning rate of the model's pretraining) and optionally --lr_max Y"
        )
    if lr_max is not None and lr_max < lr_min:
        raise ConfigError(f"--lr_max: {lr_max} is below lr_min {lr_min}, expected lr_max >= lr_min")
    out = {"name": "imported", "lr_max": lr_max, "lr_min": lr_min, "source": source}
    if reference:
        out["reference"] = reference
    return out


def _plan_import(model_dir: str, out_dir: str, lr_min: float | None, lr_max: float | None) -> _ImportPlan:
    out = _check_out_dir(out_dir)
    model_dir = os.path.abspath(os.path.expanduser(model_dir))
    if not os.path.isdir(model_dir):
        raise ConfigError(f"--model_dir {model_dir}: not a directory, expected a Hugging Face model directory")
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConfigError(f"{config_path}: missing, expected the model's config.json")
    hf_config = _read_json(config_path, "the model's config.json")
    if not isinstance(hf_config, dict):
        raise ConfigError(f"{config_path}: a JSON {type(hf_config).__name__}, expected a JSON object")
    architecture = architecture_of(hf_config, config_path)
    mc = model_config_from_hf(hf_config, architecture, config_path)

    weight_map, shards = _weight_files(model_dir)
    specs = tensor_specs(mc)
    wanted = {s.hf_name for s in specs}
    dtypes = set()
    for spec in specs:
        file = weight_map.get(spec.hf_name)
        if file is None:
            raise ConfigError(f"{model_dir}: tensor {spec.hf_name} is missing, expected it in the weights of "
                              f"{architecture} as config.json describes it")
        code, shape = shards[file].tensors[spec.hf_name]
        if shape != spec.hf_shape:
            raise ConfigError(f"{os.path.join(model_dir, file)}: tensor {spec.hf_name} has shape {shape}, "
                              f"config.json implies {spec.hf_shape}")
        if code not in _ST_DTYPES:
            raise ConfigError(f"{os.path.join(model_dir, file)}: tensor {spec.hf_name} has dtype {code}, expected "
                              "F32, F16 or BF16")
        dtypes.add(_ST_NAMES[code])
    for name, file in sorted(weight_map.items()):
        if name not in wanted and not ignorable(name, mc):
            raise ConfigError(f"{os.path.join(model_dir, file)}: unexpected tensor {name}, expected only the "
                              f"tensors of {architecture} as config.json describes it")

    tokenizer, tokenizer_files = None, [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(model_dir, f))]
    if {"tokenizer.json", "tokenizer.model"} & set(tokenizer_files):
        tokenizer = load_tokenizer(model_dir)
        if tokenizer.vocab_size > mc.vocab_size:
            raise ConfigError(f"{tokenizer.path}: {tokenizer.vocab_size} tokens exceed the embedding's "
                              f"{mc.vocab_size} rows (config.json vocab_size), expected at most {mc.vocab_size}")
    else:
        tokenizer_files = []
        _warn(f"{model_dir} has no tokenizer.json or tokenizer.model; importing the weights without a tokenizer")

    generation_path = os.path.join(model_dir, "generation_config.json")
    generation = _read_json(generation_path, "a JSON object") if os.path.isfile(generation_path) else None
    return _ImportPlan(
        model_dir=model_dir, out_dir=out, architecture=architecture, hf_config=hf_config,
        generation_config=generation if isinstance(generation, dict) else None, model_config=mc, specs=specs,
        weight_map=weight_map, shards=shards, source_dtype="+".join(sorted(dtypes)), tokenizer=tokenizer,
        tokenizer_files=tokenizer_files, schedule=_schedule(hf_config, architecture, lr_min, lr_max),
    )


def _read_params(plan: _ImportPlan) -> dict[str, Any]:
    """The parameter pytree (float32 numpy), filled one tensor at a time, one shard open at a time."""
    abstract = model.abstract_params(plan.model_config)
    params = {k: ({kk: np.empty(vv.shape, np.float32) for kk, vv in v.items()} if isinstance(v, dict)
                  else np.empty(v.shape, np.float32)) for k, v in abstract.items()}
    by_file: dict[str, list[TensorSpec]] = {}
    for spec in plan.specs:
        by_file.setdefault(plan.weight_map[spec.hf_name], []).append(spec)
    for file, specs in by_file.items():
        by_name = {spec.hf_name: spec for spec in specs}
        for name, array in plan.shards[file].read(list(by_name)):
            spec = by_name[name]
            dest = params[spec.path[0]] if len(spec.path) == 1 else params[spec.path[0]][spec.path[1]]
            if spec.layer is None:
                dest[...] = spec.to_cpt(array, dest.shape)
            else:
                dest[spec.layer] = spec.to_cpt(array, dest.shape[1:])
    return params


def _to_host_arrays(params: dict[str, Any]) -> None:
    """Replace the numpy leaves by jax arrays on the host CPU, in place, one leaf at a time (measured:
    orbax then saves a 600 MB model with ~230 MB less peak memory than from numpy leaves)."""
    import jax

    try:
        cpu = jax.devices("cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS names only accelerators: orbax saves the numpy leaves
        return
    for tree in [params, *(v for v in params.values() if isinstance(v, dict))]:
        for key in list(tree):
            if isinstance(tree[key], np.ndarray):
                tree[key] = jax.device_put(tree[key], cpu, may_alias=False)


def write_checkpoint(directory: str, params: Any, metadata: dict[str, Any]) -> None:
    """Save `params` and `metadata` as step `metadata['step']` of DIRECTORY/checkpoints (a run's layout).

    There is no optimizer state: an imported model has none, and `init_from` restores parameters
    only. orbax holds a transient copy of `params` while it writes them (with numpy or jax leaves
    alike, whatever its concurrency limits say).
    """
    checkpoint.write(os.path.join(directory, "checkpoints"), int(metadata["step"]), {"params": params}, metadata)


def _import_metadata(plan: _ImportPlan) -> dict[str, Any]:
    mc, sched, tok = plan.model_config, plan.schedule, plan.tokenizer
    return {
        "step": 0,
        "tokens_seen": 0,
        "schedule": sched,
        "lr_max": sched["lr_max"],
        "lr_min": sched["lr_min"],
        "lr": sched["lr_min"],
        "model": mc.to_dict(),
        "param_shapes": checkpoint.param_shapes(model.abstract_params(mc)),
        "tokenizer": os.path.join(plan.out_dir, "tokenizer", os.path.basename(tok.path)) if tok else None,
        "tokenizer_fingerprint": tok.fingerprint if tok else None,
        "tokenizer_vocab_size": tok.vocab_size if tok else None,
        "source_dtype": checkpoint.widest_dtype(plan.source_dtype),
        "source": {
            "format": "huggingface",
            "architecture": plan.architecture,
            "model_dir": plan.model_dir,
            "dtype": plan.source_dtype,
            "config": plan.hf_config,
            "generation_config": plan.generation_config,
        },
        "init_from": None,
    }


def _in_temp_dir(out_dir: str, write: Callable[[str], None]) -> None:
    """Run write(tmp) in a fresh directory next to out_dir, then rename it to out_dir; on any failure
    remove it, so a failed run leaves nothing behind."""
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty: checked before anything was written
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def import_hf(model_dir: str, out_dir: str, lr_min: float | None = None, lr_max: float | None = None) -> dict:
    """Convert a Hugging Face safetensors checkpoint into a cpt_jax checkpoint; returns its metadata.

    `lr_min`/`lr_max` are the final and peak learning rates of the model's pretraining; when not
    given they come from PUBLISHED_SCHEDULES, and a model found there is not required to pass them.
    Raises ConfigError (nothing written) for any problem with the inputs or `out_dir`.
    """
    plan = _plan_import(model_dir, out_dir, lr_min, lr_max)
    metadata = _import_metadata(plan)

    def write(tmp: str) -> None:
        params = _read_params(plan)
        _to_host_arrays(params)
        write_checkpoint(tmp, params, metadata)
        del params
        if plan.tokenizer_files:
            os.makedirs(os.path.join(tmp, "tokenizer"))
            for name in plan.tokenizer_files:
                shutil.copyfile(os.path.join(plan.model_dir, name), os.path.join(tmp, "tokenizer", name))

    _in_temp_dir(plan.out_dir, write)
    return checkpoint.read_metadata(plan.out_dir)


# ============================================================================ export


def _export_tokenizer(chain: list[dict[str, Any]], fingerprint: str | None, beside: str) -> list[tuple[str, str]]:
    """(source path, file name in the export) of the tokenizer files, or [] when none is known.

    `beside` is the tokenizer/ directory next to the exported checkpoint's checkpoints/: an imported
    checkpoint that was moved still finds its own copy there.
    """
    for depth, meta in enumerate(chain):
        path = meta.get("tokenizer") or ((meta.get("config") or {}).get("data") or {}).get("tokenizer")
        if depth == 0 and meta.get("tokenizer") and not os.path.exists(path):
            path = os.path.join(beside, os.path.basename(path))
        if not path or not os.path.exists(path):
            continue
        path = resolve_tokenizer_path(path)
        if fingerprint and file_sha256(path) != fingerprint:
            raise ConfigError(f"tokenizer {path}: its sha256 differs from the checkpoint's tokenizer_fingerprint "
                              f"{fingerprint[:16]}..., expected the tokenizer the model was trained with")
        tok = load_tokenizer(path)
        main_name = "tokenizer.json" if tok.kind == "huggingface" else "tokenizer.model"
        files = [(path, main_name)]
        folder = os.path.dirname(path)
        for name in TOKENIZER_FILES[2:]:
            if os.path.isfile(os.path.join(folder, name)):
                files.append((os.path.join(folder, name), name))
        if meta.get("source") is None and os.path.basename(path) not in TOKENIZER_FILES:
            files = files[:1]  # siblings of an arbitrarily named tokenizer file may belong to another
        return files
    return []


@dataclasses.dataclass
class _ExportPlan:
    checkpoint_dir: str
    out_dir: str
    metadata: dict[str, Any]
    model_config: model.ModelConfig
    architecture: str
    dtype: str
    dtype_reason: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer_files: list[tuple[str, str]]


def _plan_export(checkpoint_dir: str, out_dir: str, dtype: str | None) -> _ExportPlan:
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ConfigError(f"--dtype: {dtype!r}, expected one of {', '.join(EXPORT_DTYPES)}")
    root, step = checkpoint.resolve(checkpoint_dir, key="--checkpoint")
    step_dir = os.path.join(root, str(step))
    meta, c = checkpoint.read_model_config(step_dir, key="--checkpoint")
    chain = list(checkpoint.metadata_chain(meta))
    source = next((m["source"] for m in chain if isinstance(m.get("source"), dict)), {})
    architecture = architecture_for(c, source.get("architecture"), f"--checkpoint {step_dir}")
    if "param_shapes" in meta:
        checkpoint.check_param_shapes(meta["param_shapes"], model.abstract_params(c), f"--checkpoint {step_dir}")
    out = _check_out_dir(out_dir)

    if dtype is not None:
        reason = "--dtype"
    elif source:
        dtype, reason = checkpoint.source_dtype(meta), "the dtype it was imported in"
    else:
        dtype, reason = "float32", "trained by cpt_jax; --dtype bfloat16 halves the size"
    base = source.get("config") if source.get("architecture") == architecture else None
    beside = os.path.join(os.path.dirname(root), "tokenizer")
    tokenizer_files = _export_tokenizer(chain, meta.get("tokenizer_fingerprint"), beside)
    tokenizer = load_tokenizer(tokenizer_files[0][0]) if tokenizer_files else None
    if tokenizer is None:
        _warn(f"no tokenizer is recorded for {step_dir}; exporting the weights without tokenizer files")
    config = hf_config_for(c, architecture, dtype, base, tokenizer)
    generation = source.get("generation_config") if base is not None else None
    if not isinstance(generation, dict):
        generation = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if config.get(key) is not None:
                generation[key] = config[key]
    return _ExportPlan(step_dir, out, meta, c, architecture, dtype, reason, config, generation, tokenizer_files)


def _write_safetensors(path: str, entries: list[tuple[str, str, tuple[int, ...], Callable[[], np.ndarray]]]) -> int:
    """Write (name, dtype code, shape, producer) tensors to one safetensors file, computing each
    tensor only when its bytes are written; returns the data size in bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, code, shape, _ in entries:
        size = math.prod(shape) * _ST_DTYPES[code].itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format aligns the data to 8 bytes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, code, shape, produce in entries:
            array = np.ascontiguousarray(produce().astype(_ST_DTYPES[code], copy=False))
            if sys.byteorder != "little":
                array = array.byteswap()  # the format is little-endian
            if array.shape != tuple(shape):
                raise AssertionError(f"{name}: produced {array.shape}, planned {shape}")
            f.write(array.tobytes())
    return offset


def _host_target(c: model.ModelConfig) -> Any:
    """Abstract parameters placed on the host CPU: an export never needs the accelerator's memory."""
    import jax

    try:
        where: Any = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    except RuntimeError:  # JAX_PLATFORMS names only accelerators
        where = None
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), model.abstract_params(c))


def export_hf(checkpoint_dir: str, out_dir: str, dtype: str | None = None, *,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """Write a cpt_jax checkpoint as a Hugging Face model directory loadable by transformers.

    The architecture is the family whose options the model has (hf_arch.architecture_for; the one
    it was imported from when it fits). Weights are cast to `dtype`, by default the dtype the model
    was imported in (`source_dtype` of its metadata or of the checkpoint it continues), float32 for
    a model cpt_jax trained from scratch, and split into shards of at most `max_shard_bytes` (with
    model.safetensors.index.json when there are several). Returns {"architecture", "dtype",
    "dtype_reason"}. Raises ConfigError (nothing written) for a model with no Hugging Face
    equivalent or a bad `out_dir`.
    """
    import jax

    plan = _plan_export(checkpoint_dir, out_dir, dtype)
    c, code = plan.model_config, EXPORT_DTYPES[plan.dtype]
    specs = tensor_specs(c)
    itemsize = _ST_DTYPES[code].itemsize
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.hf_shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]

    def write(tmp: str) -> None:
        restored = checkpoint.restore_from(plan.checkpoint_dir, params=_host_target(c))["params"]
        params = jax.tree.map(np.asarray, restored)  # zero-copy views of host buffers

        def producer(spec: TensorSpec) -> Callable[[], np.ndarray]:
            def produce() -> np.ndarray:
                p = params[spec.path[0]] if len(spec.path) == 1 else params[spec.path[0]][spec.path[1]]
                return spec.to_hf(np.asarray(p if spec.layer is None else p[spec.layer]))

            return produce

        total, weight_map = 0, {}
        for name, shard in zip(names, shards, strict=True):
            entries = [(s.hf_name, code, s.hf_shape, producer(s)) for s in shard]
            total += _write_safetensors(os.path.join(tmp, name), entries)
            weight_map.update({s.hf_name: name for s in shard})
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(os.path.join(tmp, INDEX_FILE), index)
        _write_json(os.path.join(tmp, "config.json"), plan.config)
        _write_json(os.path.join(tmp, "generation_config.json"), plan.generation_config)
        for src, name in plan.tokenizer_files:
            shutil.copyfile(src, os.path.join(tmp, name))

    _in_temp_dir(plan.out_dir, write)
    return {"architecture": plan.architecture, "dtype": plan.dtype, "dtype_reason": plan.dtype_reason}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# ============================================================================ logit check


def check_logits(model_dir: str, checkpoint_dir: str, *, batch_size: int = 2, seq_len: int = 64,
                 seed: int = 0) -> dict[str, Any]:
    """Run the transformers model and the cpt_jax checkpoint on the same random tokens in float32.

    Returns max_abs_diff, max_rel_diff (max |diff| / max |logit| of transformers), max_abs_logit and
    shape [B, T, V]. T is seq_len capped at the model's max_seq_len.
    """
    import jax
    import jax.numpy as jnp
    import torch
    from transformers import AutoModelForCausalLM

    decoder, c = model.load(checkpoint_dir, dtype="float32")
    try:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--model_dir {model_dir}: transformers cannot load it ({first_line(e)})") from None
    hf.eval()
    T = min(seq_len, c.max_seq_len)
    vocab = min(c.vocab_size, int(hf.config.vocab_size))
    tokens = np.random.default_rng(seed).integers(0, vocab, (batch_size, T), dtype=np.int32)
    with torch.no_grad():
        ref = hf(input_ids=torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()
    # fp32 matmuls at full precision on every backend (GPUs default to TF32 otherwise).
    with jax.default_matmul_precision("highest"):
        got = np.asarray(decoder(jnp.asarray(tokens)), np.float32)
    if ref.shape != got.shape:
        raise ConfigError(f"--checkpoint {checkpoint_dir}: logits of shape {got.shape}, transformers gives "
                          f"{ref.shape}, expected the same model")
    diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max())
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float(diff.max() / max(scale, np.finfo(np.float32).tiny)),
        "max_abs_logit": scale,
        "shape": list(ref.shape),
    }


# ============================================================================ command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of `python -m cpt_jax.hf`."""
    p = argparse.ArgumentParser(prog="python -m cpt_jax.hf",
                                description="Hugging Face safetensors <-> cpt_jax checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("import", help="Hugging Face model directory -> cpt_jax checkpoint")
    i.add_argument("--model_dir", required=True, help="Directory with config.json and safetensors weights.")
    i.add_argument("--out", required=True, help="New (or empty) directory for the cpt_jax checkpoint.")
    i.add_argument("--lr_min", type=float, default=None,
                   help="Final LR of the model's pretraining (the recipe starts there); default: published table.")
    i.add_argument("--lr_max", type=float, default=None, help="Peak LR of the model's pretraining (recorded).")
    e = sub.add_parser("export", help="cpt_jax checkpoint -> Hugging Face model directory")
    e.add_argument("--checkpoint", required=True, help="A checkpoint directory, its checkpoints/ or a step directory.")
    e.add_argument("--out", required=True, help="New (or empty) directory for the Hugging Face model.")
    e.add_argument("--dtype", default=None, choices=sorted(EXPORT_DTYPES),
                   help="dtype of the weights (default: the dtype the model was imported in; float32 for a model "
                        "cpt_jax trained from scratch).")
    k = sub.add_parser("check", help="compare the logits of a Hugging Face model and a cpt_jax checkpoint (fp32)")
    k.add_argument("--model_dir", required=True)
    k.add_argument("--checkpoint", required=True)
    k.add_argument("--atol", type=float, default=1e-4, help="Largest allowed |logit difference|.")
    k.add_argument("--batch_size", type=int, default=2)
    k.add_argument("--seq_len", type=int, default=64)
    k.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, 1 when check exceeds --atol)."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "import":
            meta = import_hf(args.model_dir, args.out, lr_min=args.lr_min, lr_max=args.lr_max)
            mc = model.ModelConfig.from_config(meta["model"])
            sched = meta["schedule"]
            print(f"imported {meta['source']['architecture']} ({mc.num_params() / 1e6:.1f}M parameters, "
                  f"{meta['source']['dtype']}) into {os.path.abspath(args.out)}; lr_min {sched['lr_min']:g} "
                  f"({sched['source']}), tokenizer {meta['tokenizer'] or 'none'}; continue with "
                  f"--config configs/cpt_hf.py:{os.path.abspath(args.out)}")
        elif args.command == "export":
            r = export_hf(args.checkpoint, args.out, dtype=args.dtype)
            print(f"exported {args.checkpoint} to {os.path.abspath(args.out)} as {r['architecture']} in "
                  f"{r['dtype']} ({r['dtype_reason']})")
        else:
            r = check_logits(args.model_dir, args.checkpoint, batch_size=args.batch_size, seq_len=args.seq_len,
                             seed=args.seed)
            ok = r["max_abs_diff"] <= args.atol
            print(f"logits {r['shape']}: max |diff| {r['max_abs_diff']:.3e}, max relative {r['max_rel_diff']:.3e} "
                  f"(|diff| / max |logit| {r['max_abs_logit']:.3g}); --atol {args.atol:g}: "
                  f"{'ok' if ok else 'EXCEEDED'}")
            return 0 if ok else 1
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
