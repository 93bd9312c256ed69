"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""

import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Most test time is XLA compilation of the same few steps: share compiled programs between tests,
# xdist workers and the subprocesses tests start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "cpt_jax_test_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def sp_path(tmp_path_factory):
    """A small sentencepiece model (read-only for tests)."""
    from data_helpers import make_sentencepiece

    return make_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def hf_path(tmp_path_factory):
    """A small Hugging Face byte-level BPE tokenizer.json (read-only for tests)."""
    from data_helpers import make_hf_tokenizer

    return make_hf_tokenizer(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def zoo(tmp_path_factory, sp_path):
    """Random tiny Hugging Face models and their imports, each built on first use (hf_helpers.FAMILIES)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_helpers import Zoo

    return Zoo(str(tmp_path_factory.mktemp("zoo")), sp_path)
