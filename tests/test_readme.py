"""The README's promises: its commands exist and take the flags shown; its config reference is current."""

import json
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


# `python -m MODULE [SUB] --help` for every command, in one Python process: it imports the libraries
# every entry point loads once, then each command runs as `python -m` runs it (runpy, as __main__) in
# a forked child, with its own stdout, stderr and exit status.
HELP_DRIVER = r"""
import json, os, runpy, sys, traceback
import flax, grain, jax, optax, orbax.checkpoint  # noqa: F401

out_dir = sys.argv[2]
for i, (module, *args) in enumerate(json.loads(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(out_dir, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT), fd)
        sys.argv = [module, *args]
        code = 0
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    with open(os.path.join(out_dir, f"{i}.status"), "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
"""


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    """{(module, sub): (exit status, stdout, stderr) of `python -m module [sub] --help`}."""
    commands = sorted(_by_command())
    out_dir = tmp_path_factory.mktemp("help")
    argv = [[module, *([sub] if sub else []), "--help"] for module, sub in commands]
    done = subprocess.run([sys.executable, "-c", HELP_DRIVER, json.dumps(argv), str(out_dir)], cwd=REPO,
                          capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {c: (int((out_dir / f"{i}.status").read_text()), (out_dir / f"{i}.out").read_text(),
                (out_dir / f"{i}.err").read_text()) for i, c in enumerate(commands)}


@pytest.mark.parametrize("command", sorted(_by_command()), ids=lambda c: " ".join(filter(None, c)))
def test_command_exists_and_takes_the_flags_shown(command, helps):
    module, sub = command
    flags = _by_command()[command]
    status, stdout, stderr = helps[command]
    assert status == 0, stderr[-2000:]
    for flag in flags:
        if flag.startswith("--config."):
            config.check_key(flag[len("--config."):])  # raises for a key the schema lacks
        else:
            assert flag in stdout, f"{module} {sub}: README shows {flag}, --help does not list it"


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
