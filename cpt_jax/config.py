"""The config schema (every key, its default, what it does) and its validation.

Config files in `configs/` start from `default_config()` and change what they need; any key they
add that is not declared here is an error. `validate` raises `ConfigError` (one line: key, what was
found, what is expected) before anything is compiled or written.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
from typing import Any

import ml_collections
import numpy as np
from ml_collections import config_dict

# Keys whose value may change between the start of a run and its resumption (they do not change
# the math of the run: elastic resume onto another mesh, more frequent checkpoints, ...).
OPERATIONAL_KEYS = (
    "mesh", "checkpoint", "train.log_every_steps", "train.micro_batches", "train.max_nonfinite_steps",
    "train.progress", "train.stop_at", "eval", "data.num_threads", "data.prefetch", "data.workers", "init_from",
    "init_from_optimizer", "tensorboard", "wandb",
)


class ConfigError(ValueError):
    """A user error in the config, a data directory or a checkpoint: reported as one line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """What a library's exception says, fit for a one-line ConfigError: its message's first line (up
    to `limit` characters; some run to pages), or the exception's type when the message is empty."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def default_config() -> ml_collections.ConfigDict:
    """Every config key with its default. Config files override a subset of these."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # Seeds parameter init and data order.

    c.model = ml_collections.ConfigDict()
    c.model.n_layers = 2  # Number of transformer blocks.
    c.model.d_model = 64  # Residual stream width.
    c.model.n_heads = 4  # Query heads.
    c.model.n_kv_heads = 4  # Key/value heads (grouped-query attention when fewer than n_heads).
    c.model.head_dim = 0  # Per-head width; 0 means d_model // n_heads.
    c.model.d_ff = 256  # MLP hidden width.
    c.model.vocab_size = 256  # Embedding rows (may exceed the tokenizer's vocabulary).
    c.model.max_seq_len = 256  # Longest sequence the model is trained or evaluated on.
    c.model.rope_theta = 10000.0  # RoPE base.
    # RoPE frequency scaling: 'none', 'linear' (factor) or 'llama3' (factor, low/high_freq_factor,
    # original_max_seq_len), as in Llama 3.1.
    c.model.rope_scaling = "none"
    c.model.rope_factor = 1.0  # rope_scaling linear/llama3: the context extension factor.
    c.model.rope_low_freq_factor = 1.0  # llama3 scaling: wavelengths above original/low are divided by factor.
    c.model.rope_high_freq_factor = 4.0  # llama3 scaling: wavelengths below original/high are kept.
    c.model.rope_original_max_seq_len = 8192  # llama3 scaling: the context length before extension.
    # Fraction of each head's width that RoPE rotates, the rest passing through (Nemotron: 0.5).
    c.model.partial_rotary_factor = 1.0
    c.model.mlp = "swiglu"  # 'swiglu' (Llama) or 'squared_relu' (Nemotron: no gate).
    # 'rmsnorm' (Llama), 'layernorm', or 'layernorm1p' (Nemotron: LayerNorm with a 1 + w scale).
    c.model.norm = "rmsnorm"
    c.model.norm_eps = 1e-5  # Epsilon added to the variance in RMSNorm/LayerNorm.
    # 'pre' (norm each sublayer's input) or 'post' (OLMo 2: norm the attention and MLP outputs
    # before they join the residual stream; no input norms).
    c.model.norm_position = "pre"
    # RMSNorm on queries and keys before RoPE: 'none', 'head' (Qwen3: over each head) or
    # 'projection' (OLMo 2: over the whole q and k projections).
    c.model.qk_norm = "none"
    c.model.qkv_bias = False  # Bias on q/k/v projections (Qwen2).
    c.model.tie_embeddings = False  # Output head shares the input embedding.
    c.model.dtype = "bfloat16"  # Compute dtype of matmuls and activations.
    c.model.param_dtype = "float32"  # Storage dtype of parameters (master weights).
    c.model.init_std = 0.02  # Stddev of the normal init of weights; output projections are scaled by depth.
    c.model.scan_layers = True  # Run the blocks with lax.scan: compile time independent of depth.
    c.model.remat = "none"  # Rematerialization of each block: 'none', 'full' or 'save_dots'.
    # 'auto' (XLA on every platform until cuDNN's path has been checked on a GPU), 'xla', or 'cudnn'
    # (NVIDIA GPUs, bfloat16/float16, head width a multiple of 8 up to 128; not yet run here).
    c.model.attention = "auto"

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100  # Optimizer steps of this run.
    c.train.batch_size = 8  # Global batch in sequences.
    c.train.seq_len = 128  # Tokens per sequence fed to the model.
    c.train.micro_batches = 1  # Gradient accumulation: the batch is split into this many parts.
    # Cross-entropy over chunks of this many positions (0: whole sequence), so the fp32 logits of
    # a large vocabulary are never materialized whole.
    c.train.loss_chunk_tokens = 0
    c.train.log_every_steps = 10  # Train records in metrics.jsonl every this many steps.
    c.train.max_nonfinite_steps = 10  # Stop after this many consecutive non-finite steps.
    c.train.progress = True  # Progress bar on process 0 when stderr is a terminal.
    # Stop (saving a checkpoint) once this many steps are done; 0: at train.steps. The schedule
    # still spans train.steps, so a later run with the same workdir continues exactly.
    c.train.stop_at = 0
    # Test hook: steps whose gradients are replaced by NaN (exercises the non-finite guard).
    c.train.inject_nan_steps = ()

    c.optim = ml_collections.ConfigDict()
    c.optim.b1 = 0.9  # AdamW first-moment decay.
    c.optim.b2 = 0.95  # AdamW second-moment decay.
    c.optim.eps = 1e-8  # AdamW epsilon.
    c.optim.weight_decay = 0.1  # Decoupled weight decay (multiplied by the LR, as in AdamW).
    c.optim.decay_norms_and_biases = False  # Apply weight decay to norm scales and biases too.
    c.optim.clip_norm = 1.0  # Global gradient-norm clipping; 0 disables.

    c.schedule = ml_collections.ConfigDict()
    # 'recipe' (cosine from start_lr to start_lr*final_ratio, no warmup), 'warmup_cosine',
    # 'rewarm', 'wsd', 'constant' or 'infinite'. See schedules.py.
    c.schedule.name = "recipe"
    # Starting LR of 'recipe', 'constant' and the warmup start of 'rewarm'. None: the lr_min
    # stored in the `init_from` checkpoint's metadata.
    c.schedule.start_lr = config_dict.placeholder(float)
    c.schedule.final_ratio = 0.01  # recipe: final LR as a fraction of start_lr.
    c.schedule.peak_lr = 3e-4  # warmup_cosine, rewarm, wsd, infinite: the LR after warmup.
    c.schedule.min_lr = 3e-5  # warmup_cosine, rewarm, wsd, infinite: the final LR.
    c.schedule.warmup_steps = 0  # warmup_cosine, rewarm, wsd, infinite.
    c.schedule.decay_steps = 0  # wsd: length of the final decay (0: 10% of the run).
    c.schedule.decay_shape = "linear"  # wsd: 'linear', 'cosine' or 'exponential'.
    c.schedule.cooldown_steps = 0  # infinite: cosine from peak_lr down to const_lr.
    c.schedule.const_lr = 1e-4  # infinite: the constant LR after the cooldown.
    c.schedule.anneal_steps = 0  # infinite: exponential anneal to min_lr over the last steps.

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # Pure data parallelism (replicated parameters).
    c.mesh.fsdp = -1  # Fully sharded data parallelism; -1: the devices left over.
    c.mesh.tensor = 1  # Tensor parallelism over heads and MLP width.
    # Logical-axis rule overrides as 'name=axis[+axis]' strings, e.g. ('vocab=tensor', 'mlp=').
    c.mesh.rules = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 100  # Save every this many steps (and always at the end).
    c.checkpoint.max_to_keep = 3  # Older steps are deleted; a damaged step never counts.
    c.checkpoint.async_save = True  # Save in the background while training continues.

    # A checkpoints/ directory of another run (its latest step) or one step directory: parameters
    # are restored from it, the run starts at step 0 and the recipe starts at its lr_min.
    c.init_from = ""
    c.init_from_optimizer = False  # Also restore the optimizer state of `init_from`.

    c.data = ml_collections.ConfigDict()
    c.data.kind = "synthetic"  # 'synthetic' (generated, learnable) or 'mixture' (prepared sources).
    c.data.synthetic_branching = 4  # synthetic: successors per token (entropy ln(branching)).
    c.data.tokenizer = ""  # mixture: tokenizer file (.model or tokenizer.json).
    c.data.sources = ml_collections.ConfigDict()  # mixture: {name: prepared directory}.
    c.data.phases = ()  # mixture: ({'weights': {...}}, {'weights': {...}, 'start_at': {...}}, ...)
    c.data.max_epochs_warning = 4.0  # plan: warn when a source repeats more epochs than this.
    c.data.num_threads = 2  # Reading threads per process (in each worker when data.workers > 0).
    c.data.prefetch = 2  # Batches read ahead (at least one per thread; per worker when data.workers > 0).
    # Worker processes that read and batch (grain's mp_prefetch); 0: threads of this process only.
    # Batches are identical for any number of threads and workers.
    c.data.workers = 0

    c.eval = ml_collections.ConfigDict()
    c.eval.every_steps = 0  # 0: no in-loop evaluation.
    c.eval.examples_per_source = 64  # The first N val examples of each source, the same every time.
    c.eval.batch_size = 8  # Sequences per evaluation batch.
    c.eval.sources = ml_collections.ConfigDict()  # Extra eval-only {name: prepared directory}.
    c.eval.tasks = ml_collections.ConfigDict()  # Multiple-choice tasks {name: file.jsonl}.
    # Prompts continued greedily at every evaluation (needs data.tokenizer); the continuations go
    # into metrics.jsonl and TensorBoard's text tab.
    c.eval.sample_prompts = ()
    c.eval.sample_max_new_tokens = 32  # Tokens generated per sample prompt.

    c.tensorboard = True  # TensorBoard event files in WORKDIR/tb/.
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ""  # Weights & Biases project ('' : off). Needs `pip install wandb`.
    c.wandb.entity = ""  # Weights & Biases entity (team); '': your default.
    c.wandb.run_name = ""  # Default: the workdir's name.
    return c


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{'a.b.c': value} for every leaf of a config or of its JSON form; dict-valued user sections
    (sources) and empty sections stay whole."""
    out: dict[str, Any] = {}
    items = cfg.items() if hasattr(cfg, "items") else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)) and v and key not in _FREE_FORM:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v
    return out


# Sections whose keys are the user's own names, not schema keys.
_FREE_FORM = ("data.sources", "eval.sources", "eval.tasks")


def check_keys(cfg: ml_collections.ConfigDict) -> None:
    """Every key the user set must be one the schema declares."""
    for key in flatten(cfg):
        check_key(key)


def check_key(key: str) -> None:
    """ConfigError for a key the schema does not declare, with the closest known keys."""
    known = flatten(default_config())
    if key in known or any(key.startswith(f + ".") for f in _FREE_FORM):
        return
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see `default_config()` in cpt_jax/config.py"
    raise ConfigError(f"config key '{key}': unknown key{hint}")


def to_json(cfg: ml_collections.ConfigDict) -> str:
    """The resolved config as stable JSON (written to WORKDIR/config.json)."""
    return json.dumps(plain(cfg.to_dict()), indent=2, sort_keys=True)


def plain(x: Any) -> Any:
    """`x` with only what JSON holds: dicts with string keys, lists, Python scalars (a config's
    field references resolved, numpy scalars converted)."""
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, config_dict.FieldReference):
        return plain(x.get())
    return x.item() if isinstance(x, np.generic) else x


def run_identity_diff(saved: dict, current: dict) -> str | None:
    """The first key (outside OPERATIONAL_KEYS) whose value differs, as 'key: a there, b here'."""
    fs, fc = flatten(saved), flatten(current)
    for key in sorted(set(fs) | set(fc)):
        if any(key == op or key.startswith(op + ".") for op in OPERATIONAL_KEYS):
            continue
        if fs.get(key, "<absent>") != fc.get(key, "<absent>"):
            return f"{key}: {fs.get(key, '<absent>')!r} there, {fc.get(key, '<absent>')!r} here"
    return None


_CHOICES = {
    "model.mlp": ("swiglu", "squared_relu"),
    "model.norm": ("rmsnorm", "layernorm", "layernorm1p"),
    "model.norm_position": ("pre", "post"),
    "model.qk_norm": ("none", "head", "projection"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "save_dots"),
    "model.attention": ("auto", "xla", "cudnn"),
    "data.kind": ("synthetic", "mixture"),
}

_POSITIVE_INTS = (
    "model.n_layers", "model.d_model", "model.n_heads", "model.n_kv_heads", "model.d_ff", "model.vocab_size",
    "model.max_seq_len", "train.steps", "train.batch_size", "train.seq_len", "train.micro_batches",
    "train.log_every_steps", "train.max_nonfinite_steps", "checkpoint.max_to_keep", "data.synthetic_branching",
    "eval.sample_max_new_tokens",
)


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks that need no files, devices or checkpoints. Raises ConfigError (one line)."""
    check_keys(cfg)
    flat = flatten(cfg)
    for key, choices in _CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r}, expected one of {', '.join(map(repr, choices))}")
    for key in _POSITIVE_INTS:
        value = flat[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{key}: {value!r}, expected a positive integer")
    m, t = cfg.model, cfg.train
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads: {m.n_heads} is not divisible by model.n_kv_heads {m.n_kv_heads}, "
                          f"expected n_heads to be a multiple of n_kv_heads")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model: {m.d_model} is not divisible by model.n_heads {m.n_heads}, "
                          f"expected a multiple (or set model.head_dim)")
    head_dim = m.head_dim or m.d_model // m.n_heads
    if not 0.0 < m.partial_rotary_factor <= 1.0:
        raise ConfigError(f"model.partial_rotary_factor: {m.partial_rotary_factor}, expected a fraction in (0, 1]")
    rotary = int(head_dim * m.partial_rotary_factor)
    if m.partial_rotary_factor == 1.0 and head_dim % 2:
        raise ConfigError(f"model.head_dim: {head_dim}, expected an even width for RoPE")
    if rotary < 2 or rotary % 2:
        raise ConfigError(f"model.partial_rotary_factor: {m.partial_rotary_factor} of head_dim {head_dim} rotates "
                          f"{rotary} dimensions, expected an even number of at least 2")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len: {t.seq_len}, expected at most model.max_seq_len {m.max_seq_len}")
    if t.batch_size % t.micro_batches:
        raise ConfigError(f"train.micro_batches: {t.micro_batches} does not divide train.batch_size {t.batch_size}, "
                          f"expected a divisor")
    if t.loss_chunk_tokens < 0 or (t.loss_chunk_tokens and t.seq_len % t.loss_chunk_tokens):
        raise ConfigError(
            f"train.loss_chunk_tokens: {t.loss_chunk_tokens}, expected 0 or a divisor of train.seq_len {t.seq_len}"
        )
    o = cfg.optim
    for key in ("b1", "b2"):
        if not 0.0 <= o[key] < 1.0:
            raise ConfigError(f"optim.{key}: {o[key]}, expected a value in [0, 1)")
    if o.eps <= 0:
        raise ConfigError(f"optim.eps: {o.eps}, expected a positive value")
    for key in ("weight_decay", "clip_norm"):
        if o[key] < 0:
            raise ConfigError(f"optim.{key}: {o[key]}, expected a value >= 0")
    if t.stop_at < 0 or t.stop_at > t.steps:
        raise ConfigError(f"train.stop_at: {t.stop_at}, expected 0 (run to the end) or a step in [1, {t.steps}]")
    d = cfg.data
    for key, least, what in (("num_threads", 1, "thread"), ("prefetch", 1, "batch"), ("workers", 0, "workers")):
        if isinstance(d[key], bool) or not isinstance(d[key], int) or d[key] < least:
            raise ConfigError(f"data.{key}: {d[key]!r}, expected at least {least} {what}"
                              + (" (0: read in this process)" if key == "workers" else ""))
    if cfg.checkpoint.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps: {cfg.checkpoint.every_steps}, expected a value >= 0")
    if cfg.wandb.project and importlib.util.find_spec("wandb") is None:
        raise ConfigError(f"wandb.project: {cfg.wandb.project!r} but the wandb package is not installed, expected "
                          f"`pip install wandb` or wandb.project=''")
    if cfg.init_from_optimizer and not cfg.init_from:
        raise ConfigError("init_from_optimizer: True without init_from, expected init_from to name a checkpoint")
