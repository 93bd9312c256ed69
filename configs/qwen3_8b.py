"""Model preset qwen3_8b with the default recipe settings (override data and schedule on the command line)."""

from cpt_jax.presets import preset_config


def get_config():
    return preset_config("qwen3_8b")
