"""A run's workdir: it holds this run (its config.json) or nothing yet, it can be written, it has
room for a checkpoint; and the resolved config written into it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections

from cpt_jax import config
from cpt_jax.config import ConfigError


def check_same_run(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """The workdir's config.json, if any, is this run's (the keys that define a run are equal)."""
    saved_config = os.path.join(workdir, "config.json")
    if os.path.exists(saved_config):
        try:
            with open(saved_config) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{saved_config}: unreadable ({e}), expected this run's config JSON") from None
        diff = config.run_identity_diff(saved, json.loads(config.to_json(cfg)))
        if diff:
            raise ConfigError(
                f"{saved_config}: the workdir holds a different run ({diff}); use a new --workdir or the same config"
            )
    elif os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir: {workdir} exists and is not a directory")


def check_writable(workdir: str, checkpoint_bytes: int) -> None:
    """The workdir can be created and written, and has room for a checkpoint (nothing is left behind)."""
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"--workdir: {existing} is a file, expected {workdir} to be a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise ConfigError(
            f"--workdir: cannot write in {existing} ({e.strerror}), expected a writable directory"
        ) from None
    free = shutil.disk_usage(existing).free
    if free < checkpoint_bytes:
        raise ConfigError(
            f"--workdir: {existing} has {free / 2**20:.1f} MiB free, a checkpoint of this model needs about "
            f"{checkpoint_bytes / 2**20:.1f} MiB; free space or use another --workdir"
        )


def write_config(workdir: str, cfg: ml_collections.ConfigDict) -> None:
    """WORKDIR/config.json: the resolved config (process 0 writes it)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json(cfg))
