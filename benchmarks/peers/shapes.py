"""The runs both trainers make in the peer benchmark: one decoder shape, one batch, one recipe.

Plain Python (no jax, no cpt_jax): the MaxText side imports it from MaxText's own virtualenv.
A `Run` says everything both sides must agree on; `cpt_jax_overrides` and `maxtext_overrides`
spell it in each trainer's own config language, so the two spellings sit side by side here.
"""

from __future__ import annotations

import dataclasses

# The names of the remat policies on each side that save the same activations: 'full' saves only
# each block's input (both sides); 'save_dots' keeps every projection's output (cpt_jax saves
# the dots without batch dimensions, MaxText's 'minimal' names the same projections).
REMAT = {"full": "full", "save_dots": "minimal"}


@dataclasses.dataclass(frozen=True)
class Run:
    """A Llama-family decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU, untied head), its
    batch and its optimizer (AdamW b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1 on every parameter,
    global-norm clipping at 1, a constant LR)."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    batch: int
    seq_len: int
    dtype: str = "float32"
    remat: str = "full"
    steps: int = 10  # timed steps, after WARMUP_STEPS untimed ones
    lr: float = 1e-4
    seed: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


WARMUP_STEPS = 2  # the first steps pay for allocation and caches on both sides

SHAPES = {
    # cpt_jax's 'tiny' preset (about 1M parameters): a step is milliseconds, so per-step overhead shows.
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=384, vocab_size=512, batch=8,
                 seq_len=256),
    # Six Llama blocks under a 32k vocabulary (about 52M parameters, 63% of them embedding and head):
    # the regime of a small model, where the output projection and the loss weigh most.
    "llama6_32k": dict(n_layers=6, d_model=512, n_heads=8, n_kv_heads=4, head_dim=64, d_ff=1536, vocab_size=32000,
                       batch=4, seq_len=256),
}


def make_run(shape: str, **changes) -> Run:
    """The run of a named shape, with any field changed (dtype, remat, steps, batch, seq_len, ...)."""
    if shape not in SHAPES:
        raise ValueError(f"--shapes: {shape!r}, expected some of {', '.join(SHAPES)}")
    run = Run(name=shape, **SHAPES[shape])
    run = dataclasses.replace(run, **{k: v for k, v in changes.items() if v is not None})
    if run.remat not in REMAT:
        raise ValueError(f"--remat: {run.remat!r}, expected one of {', '.join(REMAT)} (MaxText rematerialises every "
                         f"scanned block, so 'none' has no counterpart there)")
    if run.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype: {run.dtype!r}, expected float32 or bfloat16")
    return run


def params(run: Run) -> int:
    """Parameter count of the decoder: embedding, blocks, final norm, head."""
    D, N, K, H, F, V = run.d_model, run.n_heads, run.n_kv_heads, run.head_dim, run.d_ff, run.vocab_size
    block = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F + 2 * D
    return run.n_layers * block + D + 2 * V * D


def cpt_jax_overrides(run: Run) -> list[str]:
    """--config.* flags for configs/tiny.py that make cpt_jax train `run`."""
    values = {
        "model.n_layers": run.n_layers, "model.d_model": run.d_model, "model.n_heads": run.n_heads,
        "model.n_kv_heads": run.n_kv_heads, "model.head_dim": run.head_dim, "model.d_ff": run.d_ff,
        "model.vocab_size": run.vocab_size, "model.max_seq_len": max(run.seq_len, 256), "model.dtype": run.dtype,
        "model.param_dtype": "float32", "model.scan_layers": True, "model.remat": run.remat, "model.attention": "xla",
        "model.rope_theta": 10000.0, "model.norm_eps": 1e-5, "model.tie_embeddings": False,
        "train.batch_size": run.batch, "train.seq_len": run.seq_len, "train.micro_batches": 1,
        "train.loss_chunk_tokens": 0, "train.steps": run.steps + WARMUP_STEPS,
        "optim.b1": 0.9, "optim.b2": 0.95, "optim.eps": 1e-8, "optim.weight_decay": 0.1,
        "optim.decay_norms_and_biases": True, "optim.clip_norm": 1.0,
        "schedule.name": "constant", "schedule.start_lr": run.lr,
        "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "seed": run.seed,
    }
    return [f"--config.{k}={v}" for k, v in values.items()]


def maxtext_overrides(run: Run, output_dir: str, hardware: str) -> list[str]:
    """key=value arguments after MaxText's base.yml that make MaxText train `run`."""
    values = {
        "run_name": f"peer_{run.name}", "base_output_directory": output_dir, "hardware": hardware,
        "decoder_block": "llama2", "base_num_decoder_layers": run.n_layers, "base_emb_dim": run.d_model,
        "base_num_query_heads": run.n_heads, "base_num_kv_heads": run.n_kv_heads, "head_dim": run.head_dim,
        "base_mlp_dim": run.d_ff, "vocab_size": run.vocab_size, "mlp_activations": "['silu','linear']",
        "logits_via_embedding": False, "normalization_layer_epsilon": 1e-5, "rope_max_timescale": 10000,
        "dtype": run.dtype, "weight_dtype": "float32", "scan_layers": True, "remat_policy": REMAT[run.remat],
        "attention": "dot_product", "enable_dropout": False, "z_loss_multiplier": 0.0,
        "per_device_batch_size": run.batch, "max_target_length": run.seq_len, "steps": run.steps + WARMUP_STEPS,
        "opt_type": "adamw", "adam_b1": 0.9, "adam_b2": 0.95, "adam_eps": 1e-8, "adam_weight_decay": 0.1,
        "gradient_clipping_threshold": 1.0, "learning_rate": run.lr, "warmup_steps_fraction": 0.0,
        "learning_rate_final_fraction": 1.0, "init_weights_seed": run.seed,
        "dataset_type": "synthetic", "enable_checkpointing": False, "eval_interval": -1,
        "ici_fsdp_parallelism": 1, "skip_jax_distributed_system": True, "jax_cache_dir": "",
        "enable_goodput_recording": False, "monitor_goodput": False, "enable_tensorboard": False,
    }
    return [f"{k}={v}" for k, v in values.items()]
