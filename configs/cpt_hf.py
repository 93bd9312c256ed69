"""The recipe, continuing a model imported from Hugging Face (`python -m cpt_jax.hf import`).

The trainer takes the architecture from the config, not from the checkpoint it starts from, so the
config's `model` keys must describe the imported model. Two forms:

1. `--config configs/cpt_hf.py:/path/to/imported` (recommended): the model keys, `init_from` and
   `data.tokenizer` are read from the imported checkpoint's metadata, so they match it exactly
   (rope scaling, norm eps and context length included).

2. `--config configs/cpt_hf.py:llama3_8b` (any preset of cpt_jax/presets.py) plus
   `--config.init_from=/path/to/imported --config.data.tokenizer=/path/to/imported/tokenizer/tokenizer.json`.
   The trainer refuses a checkpoint whose parameter shapes differ from the preset's, but it cannot
   see settings that change no shape: the presets have no rope scaling, so for Llama 3.1/3.2 add
   `--config.model.rope_scaling=llama3 --config.model.rope_factor=8 --config.model.rope_low_freq_factor=1
   --config.model.rope_high_freq_factor=4 --config.model.rope_original_max_seq_len=8192
   --config.model.max_seq_len=131072`, and set `model.norm_eps` to config.json's rms_norm_eps where it
   differs. The `model` section of the import's metadata lists every value to match.

Either way the schedule is the recipe: it starts at the imported checkpoint's lr_min (the final LR of
the model's pretraining, recorded at import) and cosines to 1/100 of it. Set the sources to your
prepared data (made with the imported tokenizer) and the blends to your mix.
"""

import os

from cpt_jax import checkpoint
from cpt_jax.config import default_config
from cpt_jax.presets import apply_recipe, preset_config

# Keys of the model section that describe how to compute, not what the checkpoint holds: they keep
# this config's values whatever the import recorded.
_COMPUTE_KEYS = ("dtype", "param_dtype", "init_std", "scan_layers", "remat", "attention")


def get_config(arg: str = "llama3_8b"):
    arg = arg or "llama3_8b"
    path = os.path.abspath(os.path.expanduser(arg))
    if os.sep in arg or os.path.isdir(path):
        meta = checkpoint.read_metadata(path, key="configs/cpt_hf.py")
        c = default_config()
        c.model.update({k: v for k, v in meta["model"].items() if k in c.model and k not in _COMPUTE_KEYS})
        c.init_from = path
        tokenizer = meta.get("tokenizer")
        if tokenizer and os.path.isfile(os.path.join(path, "tokenizer", os.path.basename(tokenizer))):
            tokenizer = os.path.join(path, "tokenizer", os.path.basename(tokenizer))  # the import was moved
        c.data.tokenizer = tokenizer or "/path/to/tokenizer.json"
        c.train.seq_len = min(c.model.max_seq_len, 4096)
    else:
        c = preset_config(arg)
        c.init_from = "/path/to/imported"
        c.data.tokenizer = "/path/to/imported/tokenizer/tokenizer.json"
    return apply_recipe(c)
