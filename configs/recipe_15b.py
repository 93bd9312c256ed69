"""The paper's run: Nemotron-4 15B continued for 300B tokens with the "Reuse, Don't Retrain" recipe.

Batch 1152 x 4096, LR from the checkpoint's eta_min 4.5e-5 with no warmup, cosine to 1/100 of it,
AdamW 0.9/0.95/0.1, General Blend then QA Blend when the LR reaches start/5 (71.1% of the run,
about 213.4B tokens). Paths are placeholders: point them at your prepared data and checkpoint.
"""

from cpt_jax.presets import preset_config

# General Blend: close to pretraining, upweighting high-quality non-web sources (docs/recipe.md).
GENERAL_BLEND = {"web_hq": 0.45, "books": 0.15, "code": 0.15, "stem": 0.15, "multilingual": 0.10, "qa": 0.0}
# QA Blend: the General Blend plus about 10% question-answer data, STEM upweighted.
QA_BLEND = {"web_hq": 0.35, "books": 0.12, "code": 0.13, "stem": 0.20, "multilingual": 0.10, "qa": 0.10}


def get_config():
    c = preset_config("nemotron4_15b")
    c.train.seq_len = 4096
    c.train.batch_size = 1152
    c.train.steps = 63579  # 300.0B tokens / (1152 * 4096) tokens per step
    c.train.log_every_steps = 10
    c.schedule.name = "recipe"
    c.schedule.start_lr = 4.5e-5  # the pretrained run's eta_min (read from init_from when unset)
    c.schedule.final_ratio = 0.01
    c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.95, 0.1
    c.mesh.fsdp, c.mesh.tensor = -1, 8
    c.checkpoint.every_steps = 1000
    c.init_from = "/path/to/nemotron4_15b/checkpoints"
    c.data.kind = "mixture"
    c.data.tokenizer = "/path/to/nemotron4_15b/tokenizer.model"
    for name in GENERAL_BLEND:
        c.data.sources[name] = f"/path/to/prepared/{name}"
    c.data.phases = (
        dict(weights=GENERAL_BLEND),
        dict(weights=QA_BLEND, start_at=dict(lr_ratio=0.2)),
    )
    return c
