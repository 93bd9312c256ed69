"""The README's promises: its commands exist and take the flags shown; its config reference is current."""

import os
import re
import shlex
import subprocess
import sys

import pytest

from cpt_jax import config, config_doc

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
SUBCOMMANDS = {"cpt_jax.hf", "cpt_jax.tokenizer", "cpt_jax.tasks"}


def _commands():
    """Every `python -m cpt_jax.X ...` line of the README's code blocks (continuations joined)."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip().startswith("python -m cpt_jax.")]


def _by_command():
    grouped: dict[tuple[str, str], set[str]] = {}
    for line in _commands():
        words = shlex.split(line)
        module = words[2]
        sub = words[3] if module in SUBCOMMANDS else ""
        flags = {w.split("=", 1)[0] for w in words if w.startswith("--")}
        grouped.setdefault((module, sub), set()).update(flags)
    return grouped


def test_readme_starts_with_the_two_commands():
    head = README.split("```")[1]
    assert "make demo" in head and "make test" in head


def test_readme_shows_every_entry_point():
    shown = {module for module, _ in _by_command()}
    for module in ("cpt_jax.train", "cpt_jax.prepare", "cpt_jax.plan", "cpt_jax.evaluate", "cpt_jax.hf",
                   "cpt_jax.plot", "cpt_jax.tokenizer", "cpt_jax.sample"):
        assert module in shown, module


@pytest.mark.parametrize("command", sorted(_by_command()), ids=lambda c: " ".join(filter(None, c)))
def test_command_exists_and_takes_the_flags_shown(command):
    module, sub = command
    flags = _by_command()[command]
    argv = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in flags:
        if flag.startswith("--config."):
            config.check_key(flag[len("--config."):])  # raises for a key the schema lacks
        else:
            assert flag in out.stdout, f"{module} {sub}: README shows {flag}, --help does not list it"


def test_benchmark_commands_exist():
    for path in re.findall(r"python (benchmarks/\w+\.py)", README):
        assert os.path.isfile(os.path.join(REPO, path)), path


def test_config_reference_is_current():
    assert config_doc.section(README) == config_doc.render(), (
        "README's config reference is stale: python -m cpt_jax.config_doc --write README.md"
    )


def test_every_config_key_is_documented():
    docs = config_doc.descriptions()
    missing = [k for k in config.flatten(config.default_config()) if not docs.get(k)]
    assert not missing, missing
