"""A checkpoint's model as `evaluate`, `sample` and `hf check` read it: its parameters restored for
evaluation, what its metadata and its run's config say about its tokenizer, data sources and BOS,
and the flags (--bos, --dtype) every such command takes."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from cpt_jax import checkpoint, model
from cpt_jax.config import ConfigError
from cpt_jax.data import sources as sources_lib
from cpt_jax.data.tokenization import BOS_CHOICES, resolve_bos
from cpt_jax.model import ModelConfig


def restore_params(checkpoint_dir: str, meta: dict[str, Any], mc: ModelConfig, shardings: Any) -> Any:
    """The checkpoint's parameters restored with `shardings` (ConfigError naming --checkpoint when
    their shapes differ from the model's or the arrays fail to restore)."""
    abstract = model.abstract_params(mc)
    if isinstance(meta.get("param_shapes"), dict):
        checkpoint.check_param_shapes(meta["param_shapes"], abstract, f"--checkpoint {checkpoint_dir}")
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    try:
        return checkpoint.restore_from(checkpoint_dir, params=target)["params"]
    except ConfigError:
        raise
    except Exception as e:  # orbax: a damaged or incomplete step
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        raise ConfigError(f"--checkpoint {checkpoint_dir}: the parameters failed to restore ({reason})") from None


def checkpoint_tokenizer(checkpoint_dir: str, meta: dict[str, Any] | None = None, hops: int = 8) -> str | None:
    """The tokenizer file a checkpoint names, or None: its metadata `tokenizer` (an imported
    model's copy; also looked for in the tokenizer/ directory beside its checkpoints/), else its
    run's config.data.tokenizer, else the same for the checkpoint it was initialised from (up to
    `hops` checkpoints back)."""
    try:
        meta = meta if meta is not None else checkpoint.read_metadata(checkpoint_dir)
        root, _ = checkpoint.resolve(checkpoint_dir)
    except ConfigError:
        return None
    candidates = []
    own = meta.get("tokenizer")
    if isinstance(own, str) and own:
        candidates += [own, os.path.join(os.path.dirname(root), "tokenizer", os.path.basename(own))]
    data = (meta.get("config") or {}).get("data") or {}
    if isinstance(data.get("tokenizer"), str) and data["tokenizer"]:
        candidates.append(data["tokenizer"])
    found = next((c for c in candidates if os.path.exists(c)), None)
    if found or not meta.get("init_from") or hops <= 1:
        return found
    return checkpoint_tokenizer(meta["init_from"], None, hops - 1)


def _data_sources(meta: dict[str, Any]) -> dict[str, Any]:
    """The run's data.sources ({} unless data.kind is 'mixture')."""
    data = (meta.get("config") or {}).get("data") or {}
    return dict(data.get("sources") or {}) if data.get("kind", "mixture") == "mixture" else {}


def checkpoint_sources(meta: dict[str, Any], log: Callable[[str], None] | None = None) -> dict[str, str]:
    """The run's data.sources (mixture runs) and eval.sources that exist on disk with a val split."""
    named = _data_sources(meta)
    named.update(((meta.get("config") or {}).get("eval") or {}).get("sources") or {})
    out = {}
    for name, directory in named.items():
        if not isinstance(directory, str):
            continue
        try:
            if sources_lib.read_manifest(directory)["val_examples"] > 0:
                out[name] = directory
                continue
            why = "no val split"
        except ConfigError:
            why = "not found"
        if log is not None:
            log(f"note: source {name} of the checkpoint's config ({directory}): {why}; skipped")
    return out


def checkpoint_bos(meta: dict[str, Any], tok: Any, choice: str = "auto") -> bool:
    """Whether questions to this checkpoint start with BOS for `--bos` `choice`: with 'auto', as
    the documents of its run's data sources did (sources.starts_with_bos over those found on disk,
    what the in-loop evaluation uses), else (an import, sources gone) as `prepare --bos auto` would
    prepare documents for `tok`; 'always' and 'never' as prepare's --bos."""
    if choice == "auto":
        found = []
        for directory in _data_sources(meta).values():
            with contextlib.suppress(ConfigError):  # gone: checkpoint_sources notes it
                found.append((directory, sources_lib.read_manifest(directory)))
        if found:
            return sources_lib.starts_with_bos(found)
    return resolve_bos(choice, tok)


def add_checkpoint_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--checkpoint, --bos (read by checkpoint_bos) and --dtype, as every command that reads a
    checkpoint's model with its tokenizer takes them (evaluate's questions, sample's prompts)."""
    p.add_argument("--checkpoint", required=True,
                   help="a run's workdir, its checkpoints/ directory, a step directory or an imported model")
    p.add_argument("--bos", default="auto", choices=BOS_CHOICES,
                   help=f"BOS before every {what}: auto (default) as the checkpoint's training sources were "
                        "prepared (their manifests' add_bos; without any on disk, the tokenizer's own convention), "
                        "always, never")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: the checkpoint's model.dtype)")


def load(checkpoint_dir: str, dtype: str | None = None) -> tuple[model.Decoder, ModelConfig]:
    """(model, config) of a cpt_jax checkpoint: `model(tokens)` gives logits [B, T, V] in fp32.

    `checkpoint_dir` is a checkpoint directory (a run's workdir or an imported model), its
    checkpoints/ directory or one step directory (the latest step is taken). The architecture comes
    from the checkpoint's metadata; `dtype` (e.g. "float32") replaces its compute dtype. Parameters
    are restored onto the default device. Raises ConfigError for a missing or mismatched checkpoint.
    """
    meta, c = checkpoint.read_model_config(checkpoint_dir, key="checkpoint", dtype=dtype)
    abstract = model.abstract_params(c)
    if "param_shapes" in meta:
        checkpoint.check_param_shapes(meta["param_shapes"], abstract, f"checkpoint {checkpoint_dir}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    params = checkpoint.restore_from(checkpoint_dir, params=target)["params"]
    # Build the module without allocating a fresh init, then put the restored arrays in its place.
    decoder = nnx.eval_shape(lambda: model.Decoder(c, rngs=nnx.Rngs(params=0)))
    state = nnx.state(decoder, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(decoder, state)
    return decoder, c
