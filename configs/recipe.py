"""The recipe for your own model and data: `--config configs/recipe.py:PRESET` (default llama3_8b).

Set `init_from` to the checkpoint you continue (a cpt_jax run's checkpoints/ directory or one
imported from Hugging Face); the LR starts at its lr_min. Set the sources to your prepared data
and the blends to your mix; the switch to the QA Blend happens when the LR reaches start/5.
"""

from cpt_jax.presets import apply_recipe, preset_config


def get_config(preset: str = "llama3_8b"):
    c = preset_config(preset or "llama3_8b")
    c.init_from = "/path/to/base/checkpoints"
    c.data.tokenizer = "/path/to/base/tokenizer.model"
    return apply_recipe(c)
