"""Export a cpt_jax checkpoint as a Hugging Face model directory that transformers loads (`export_hf`).

config.json keeps what the imported model's own said and cpt_jax does not model; the weights are
written one shard at a time, so the host holds the parameters plus one shard.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from typing import Any

import jax
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from cpt_jax import checkpoint, model
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import Tokenizer, file_sha256, load_tokenizer, resolve_tokenizer_path
from cpt_jax.hf_arch import TensorSpec, architecture_for, hf_config_for, tensor_specs
from cpt_jax.hf_import import INDEX_FILE, SINGLE_FILE, TOKENIZER_FILES, check_out_dir, host_cpu, in_temp_dir, warn

DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers calls "5GB"
EXPORT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                 "float16": np.dtype(np.float16)}


def _export_tokenizer(chain: list[dict[str, Any]], fingerprint: str | None,
                      beside: str) -> tuple[Tokenizer | None, list[tuple[str, str]]]:
    """The tokenizer and (source path, file name in the export) of its files; (None, []) when none is known.

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
        folder = os.path.dirname(path)
        files = [(path, main_name)] + [(os.path.join(folder, name), name) for name in TOKENIZER_FILES[2:]
                                       if os.path.isfile(os.path.join(folder, name))]
        if meta.get("source") is None and os.path.basename(path) not in TOKENIZER_FILES:
            files = files[:1]  # siblings of an arbitrarily named tokenizer file may belong to another
        return tok, files
    return None, []


@dataclasses.dataclass
class _ExportPlan:
    checkpoint_dir: str
    out_dir: str
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
    out = check_out_dir(out_dir)

    if dtype is not None:
        reason = "--dtype"
    elif source:
        dtype, reason = checkpoint.source_dtype(meta), "the dtype it was imported in"
    else:
        dtype, reason = "float32", "trained by cpt_jax; --dtype bfloat16 halves the size"
    base = source.get("config") if source.get("architecture") == architecture else None
    beside = os.path.join(os.path.dirname(root), "tokenizer")
    tokenizer, tokenizer_files = _export_tokenizer(chain, meta.get("tokenizer_fingerprint"), beside)
    if tokenizer is None:
        warn(f"no tokenizer is recorded for {step_dir}; exporting the weights without tokenizer files")
    config = hf_config_for(c, architecture, dtype, base, tokenizer)
    generation = source.get("generation_config") if base is not None else None
    if not isinstance(generation, dict):
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        generation = {"_from_model_config": True, **{k: config[k] for k in ids if config.get(k) is not None}}
    return _ExportPlan(step_dir, out, c, architecture, dtype, reason, config, generation, tokenizer_files)


def _host_target(c: model.ModelConfig) -> Any:
    """Abstract parameters placed on the host CPU: an export never needs the accelerator's memory."""
    cpu = host_cpu()
    where = None if cpu is None else jax.sharding.SingleDeviceSharding(cpu)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where), model.abstract_params(c))


def export_hf(checkpoint_dir: str, out_dir: str, dtype: str | None = None, *,
              max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> dict[str, str]:
    """Write a cpt_jax checkpoint as a Hugging Face model directory, as the family whose options the
    model has (hf_arch.architecture_for), in `dtype` (default: the dtype it was imported in, float32
    for a model cpt_jax trained from scratch), in shards of at most `max_shard_bytes`. Returns
    {"architecture", "dtype", "dtype_reason"}; ConfigError (nothing written) for a model with no
    Hugging Face equivalent or a bad `out_dir`."""
    plan = _plan_export(checkpoint_dir, out_dir, dtype)
    c, np_dtype = plan.model_config, EXPORT_DTYPES[plan.dtype]
    shards: list[list[TensorSpec]] = [[]]
    size = total = 0
    for spec in tensor_specs(c):
        nbytes = math.prod(spec.hf_shape) * np_dtype.itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
        total += nbytes
    names = [SINGLE_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))
    ]

    def write(tmp: str) -> None:
        restored = checkpoint.restore_from(plan.checkpoint_dir, params=_host_target(c))["params"]
        params = jax.tree.map(np.asarray, restored)  # zero-copy views of host buffers
        weight_map = {}
        for name, shard in zip(names, shards, strict=True):
            tensors = {}
            for spec in shard:
                p = spec.leaf(params)
                hf = spec.to_hf(p if spec.layer is None else p[spec.layer])
                tensors[spec.hf_name] = np.ascontiguousarray(hf.astype(np_dtype, copy=False))
            save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
        if len(names) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            _write_json(os.path.join(tmp, INDEX_FILE), index)
        _write_json(os.path.join(tmp, "config.json"), plan.config)
        _write_json(os.path.join(tmp, "generation_config.json"), plan.generation_config)
        for src, name in plan.tokenizer_files:
            shutil.copyfile(src, os.path.join(tmp, name))

    in_temp_dir(plan.out_dir, write)
    return {"architecture": plan.architecture, "dtype": plan.dtype, "dtype_reason": plan.dtype_reason}


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
