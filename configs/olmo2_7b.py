"""Model preset olmo2_7b with the default recipe settings (override data and schedule on the command line)."""

from cpt_jax.presets import preset_config


def get_config():
    return preset_config("olmo2_7b")
