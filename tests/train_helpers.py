"""A small, fast training setup shared by the trainer tests (one compiled step, reused via the
persistent compilation cache)."""

SMALL_MODEL = [
    "--config=configs/tiny.py",
    "--config.model.n_layers=2",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.model.vocab_size=128",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--config.tensorboard=False",
]
