"""Command lines: `--config FILE[:arg] [--config.a.b=v ...]` plus own flags; user errors as exit status 2.

Every parse uses a fresh FlagValues, so a command can be run several times in one process (tests,
the demo). Problems with the file or an override become one-line ConfigErrors.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable

import ml_collections
from absl import flags
from ml_collections import config_flags

from cpt_jax.config import ConfigError, check_key, check_keys


def reports_config_errors(main: Callable[..., int]) -> Callable[..., int]:
    """A command's `main` that reports a ConfigError as one line, `error: ...`, on stderr and
    returns exit status 2 (the README's promise for every bad input)."""

    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return run


def parse(argv: list[str], define: Callable[[flags.FlagValues], None] | None = None
          ) -> tuple[ml_collections.ConfigDict, flags.FlagValues]:
    """(config, parsed flags). `define(flag_values)` declares the command's own flags."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:arg]).", flag_values=fv,
                                    lock_config=False)
    if define is not None:
        define(fv)
    if any(arg in ("--help", "-h", "--helpfull") for arg in argv[1:]):
        prog = os.path.basename(argv[0]) if argv else "cpt_jax"
        print(f"usage: {prog} --config FILE[:ARG] [--config.KEY=VALUE ...] [flags]\n"
              f"Every key of cpt_jax/config.py can be overridden with --config.KEY=VALUE (see the README's "
              f"config reference).\n\n{fv.get_help()}")
        raise SystemExit(0)
    for arg in argv[1:]:
        if arg.startswith("--config."):
            check_key(arg[len("--config.") :].split("=", 1)[0])
    saved_argv, sys.argv = sys.argv, list(argv)  # config_flags reads its overrides from sys.argv
    try:
        fv(argv)
    except flags.Error as e:
        raise ConfigError(_one_line(str(e))) from None
    except Exception as e:  # the config file itself failed to load (syntax error, bad import, ...)
        raise ConfigError(_one_line(f"--config: {type(e).__name__}: {e}")) from None
    finally:
        sys.argv = saved_argv
    # The flag's value may carry an argument for get_config: configs/recipe.py:llama3_8b.
    path = (fv["config"].config_filename or "").split(":", 1)[0] if fv["config"].present else ""
    if not path:
        raise ConfigError("--config: missing, expected a config file such as configs/tiny.py")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: {path} does not exist, expected a config file such as configs/tiny.py")
    try:
        cfg = fv.config
    except Exception as e:  # errors raised while running the file's get_config()
        raise ConfigError(_one_line(f"--config: {path}: {type(e).__name__}: {e}")) from None
    check_keys(cfg)
    return cfg, fv


def _one_line(message: str) -> str:
    """absl and config_flags embed whole tracebacks; keep what names the flag and the cause."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    head = lines[0].split(": Error whilst parsing config file")[0]
    return f"{head}: {lines[-1]}"
