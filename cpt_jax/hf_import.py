"""Import a Hugging Face safetensors model directory as a cpt_jax checkpoint.

The checkpoint has a training run's layout (CKPT_DIR/checkpoints/0/ with items `params` and
`metadata`, no optimizer state) plus the model's tokenizer files under CKPT_DIR/tokenizer/. Its
metadata carries what `init_from` needs: the model config, the parameter shapes, the pretraining
schedule's lr_min/lr_max and the dtype the weights came in (`source_dtype`, what export writes).
Parameters are stored in float32, where bf16 and fp16 values are exact: import then export is
bit-identical. Tensors are read one at a time into preallocated stacked arrays (the host holds the
output plus one tensor). Every user error is found before anything is written; the output is built
next to --out and renamed into place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from cpt_jax import checkpoint, model
from cpt_jax.config import ConfigError, first_line
from cpt_jax.data.tokenization import Tokenizer, load_tokenizer
from cpt_jax.hf_arch import TensorSpec, architecture_of, ignorable, model_config_from_hf, tensor_specs

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Copied with the model on import and export; the first two are the tokenizer proper.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
# safetensors dtype codes of the weights cpt_jax imports, and their numpy names.
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def warn(message: str) -> None:
    """A warning on stderr (the import or export goes on)."""
    print(f"warning: {message}", file=sys.stderr)


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

# Only schedules a paper states (LLaMA 1 and Llama 2 7B/13B share their shapes and their numbers).
# Llama 3.1 405B anneals linearly to 0 after its cosine's 8e-7 floor; the recipe restarts from that
# floor, the schedule's own final LR. Not listed: Llama 3/3.1 8B and 70B, Mistral and Qwen2, whose
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
    return next((e for e in PUBLISHED_SCHEDULES if all(fields.get(k) == v for k, v in e.match)), None)


def _read_json(path: str, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({first_line(e)}), expected {what}") from None


def _tensor_table(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (safetensors dtype code, shape)} from a safetensors file's header."""
    try:
        with safe_open(path, framework="np") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
            return {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except Exception as e:  # safetensors raises its own SafetensorError for a bad header
        raise ConfigError(f"{path}: not a readable safetensors file ({first_line(e)}), expected the "
                          "weights written by save_pretrained") from None


def _weight_files(model_dir: str) -> tuple[dict[str, str], dict[str, dict[str, tuple]]]:
    """({tensor name: file name}, {file name: its tensor table}) from the index or the single file; validated."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        index = _read_json(index_path, "a safetensors index with a weight_map")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise ConfigError(f"{index_path}: no weight_map of tensor names to files, expected one")
        shards: dict[str, dict[str, tuple]] = {}
        for file in sorted(set(weight_map.values())):
            path = os.path.join(model_dir, file)
            if os.path.basename(file) != file or not os.path.isfile(path):
                count = sum(1 for v in weight_map.values() if v == file)
                raise ConfigError(f"{index_path}: shard {file} ({count} tensors) is missing from {model_dir}, "
                                  "expected every shard the index names")
            shards[file] = _tensor_table(path)
        for name, file in weight_map.items():
            if name not in shards[file]:
                raise ConfigError(f"{index_path}: tensor {name} is mapped to {file}, which does not hold it, "
                                  "expected the index to match the shards")
        return dict(weight_map), shards
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        table = _tensor_table(single)
        return dict.fromkeys(table, SINGLE_FILE), {SINGLE_FILE: table}
    pickles = sorted(n for n in os.listdir(model_dir)
                     if n.endswith(checkpoint.PICKLE_SUFFIXES) or n.endswith(".bin.index.json"))
    if pickles:
        raise ConfigError(
            f"{model_dir}: only pickle-based weights ({', '.join(pickles[:3])}), which cpt_jax refuses to load "
            "(unpickling can run code), expected safetensors; convert with transformers: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)"
        )
    raise ConfigError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}, expected safetensors weights")


@dataclasses.dataclass
class _ImportPlan:
    """Everything validated before the first byte is written."""

    model_dir: str
    out_dir: str
    model_config: model.ModelConfig
    specs: list[TensorSpec]
    weight_map: dict[str, str]
    tokenizer: Tokenizer | None
    tokenizer_files: list[str]
    schedule: dict[str, Any]
    source: dict[str, Any]  # the metadata's record of where the weights came from


def check_out_dir(out_dir: str, flag: str = "--out") -> str:
    """The absolute output directory; ConfigError unless it is new or empty."""
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
    out = check_out_dir(out_dir)
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
        code, shape = shards[file][spec.hf_name]
        if shape != spec.hf_shape:
            raise ConfigError(f"{os.path.join(model_dir, file)}: tensor {spec.hf_name} has shape {shape}, "
                              f"config.json implies {spec.hf_shape}")
        if code not in DTYPE_NAMES:
            raise ConfigError(f"{os.path.join(model_dir, file)}: tensor {spec.hf_name} has dtype {code}, expected "
                              "F32, F16 or BF16")
        dtypes.add(DTYPE_NAMES[code])
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
        warn(f"{model_dir} has no tokenizer.json or tokenizer.model; importing the weights without a tokenizer")

    generation_path = os.path.join(model_dir, "generation_config.json")
    generation = _read_json(generation_path, "a JSON object") if os.path.isfile(generation_path) else None
    source = {"format": "huggingface", "architecture": architecture, "model_dir": model_dir,
              "dtype": "+".join(sorted(dtypes)), "config": hf_config,
              "generation_config": generation if isinstance(generation, dict) else None}
    return _ImportPlan(model_dir, out, mc, specs, weight_map, tokenizer, tokenizer_files,
                       _schedule(hf_config, architecture, lr_min, lr_max), source)


def _read_params(plan: _ImportPlan) -> dict[str, Any]:
    """The parameter pytree (float32 numpy), filled one tensor at a time, one shard open at a time:
    an open safe_open handle maps its whole file, whose pages count against the host's memory."""
    params = jax.tree.map(lambda a: np.empty(a.shape, np.float32), model.abstract_params(plan.model_config))
    by_file: dict[str, list[TensorSpec]] = {}
    for spec in plan.specs:
        by_file.setdefault(plan.weight_map[spec.hf_name], []).append(spec)
    for file, specs in by_file.items():
        with safe_open(os.path.join(plan.model_dir, file), framework="np") as f:
            for spec in specs:
                dest = spec.leaf(params)
                index = () if spec.layer is None else spec.layer  # one layer's slice of a stacked parameter
                dest[index] = spec.to_cpt(f.get_tensor(spec.hf_name), dest[index].shape)
    return params


def _to_host_arrays(params: dict[str, Any]) -> None:
    """Replace the numpy leaves by jax arrays on the host CPU, in place, one leaf at a time (measured:
    orbax then saves a 600 MB model with ~230 MB less peak memory than from numpy leaves)."""
    cpu = host_cpu()
    if cpu is None:  # orbax saves the numpy leaves
        return
    for tree in [params, *(v for v in params.values() if isinstance(v, dict))]:
        for key in list(tree):
            if isinstance(tree[key], np.ndarray):
                tree[key] = jax.device_put(tree[key], cpu, may_alias=False)


def host_cpu() -> Any:
    """The host's CPU device, where import and export keep the weights; None when JAX_PLATFORMS names
    only accelerators."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:
        return None


def write_checkpoint(directory: str, params: Any, metadata: dict[str, Any]) -> None:
    """Save `params` and `metadata` as step `metadata['step']` of DIRECTORY/checkpoints (a run's layout),
    without optimizer state (`init_from` restores parameters only). orbax holds a transient copy of
    `params` while it writes them (with numpy or jax leaves alike, whatever its concurrency limits say)."""
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
        "source_dtype": checkpoint.widest_dtype(plan.source["dtype"]),
        "source": plan.source,
        "init_from": None,
    }


def in_temp_dir(out_dir: str, write: Callable[[str], None]) -> None:
    """Run write(tmp) in a fresh directory next to out_dir, then rename it to out_dir; on any failure
    remove it, so a failed run leaves nothing behind."""
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=os.path.dirname(out_dir))
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

    `lr_min`/`lr_max`: the final and peak learning rates of the model's pretraining (default: from
    PUBLISHED_SCHEDULES). ConfigError (nothing written) for any problem with the inputs or `out_dir`.
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

    in_temp_dir(plan.out_dir, write)
    return checkpoint.read_metadata(plan.out_dir)
