"""The recipe for your own model and data: `--config configs/recipe.py:PRESET` (default llama3_8b).

Set `init_from` to the checkpoint you continue (a cpt_jax run's checkpoints/ directory or one
imported from Hugging Face); the LR starts at its lr_min. Set the sources to your prepared data
and the blends to your mix; the switch to the QA Blend happens when the LR reaches start/5.
"""

from cpt_jax.presets import preset_config


def get_config(preset: str = "llama3_8b"):
    c = preset_config(preset or "llama3_8b")
    c.train.steps = 10000
    c.train.batch_size = 512
    c.train.log_every_steps = 10
    c.schedule.name = "recipe"  # start_lr None: the init_from checkpoint's lr_min
    c.schedule.final_ratio = 0.01
    c.checkpoint.every_steps = 500
    c.init_from = "/path/to/base/checkpoints"
    c.data.kind = "mixture"
    c.data.tokenizer = "/path/to/base/tokenizer.model"
    c.data.sources.pretraining_like = "/path/to/prepared/pretraining_like"
    c.data.sources.new_domain = "/path/to/prepared/new_domain"
    c.data.sources.qa = "/path/to/prepared/qa"
    c.data.phases = (
        dict(weights={"pretraining_like": 0.7, "new_domain": 0.3, "qa": 0.0}),
        dict(weights={"pretraining_like": 0.55, "new_domain": 0.35, "qa": 0.10}, start_at=dict(lr_ratio=0.2)),
    )
    return c
