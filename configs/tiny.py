"""A ~1M-parameter model on synthetic data: trains on a CPU in seconds (tests, smoke runs, the demo)."""

from cpt_jax.presets import preset_config


def get_config():
    c = preset_config("tiny")
    c.model.dtype = "float32"  # CPU: bf16 matmuls are emulated and slower than fp32 there.
    c.train.steps = 100
    c.train.batch_size = 16
    c.train.seq_len = 64
    c.train.log_every_steps = 10
    c.schedule.name = "warmup_cosine"
    c.schedule.peak_lr = 3e-3
    c.schedule.min_lr = 3e-4
    c.schedule.warmup_steps = 10
    c.checkpoint.every_steps = 50
    return c
