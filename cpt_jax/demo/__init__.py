"""The recipe end to end on generated data, as evidence: `python -m cpt_jax.demo`.

    python -m cpt_jax.demo [--workdir DIR] [--scale tiny|small|medium] [--seeds N]
                           [--ablations all|switch,floor,warmup]

Per seed: a generated corpus (corpus.py), its tokenizer and prepared sources, a base model
pretrained on population A until its validation loss has flattened, and continued runs from the
base's checkpoint with the same token budget each (runs.py: baseline, recipe, rewarm and, with
--ablations, the variants of the paper's other questions). Then DIR/report.md and DIR/report.png
answer the paper's four questions agree / disagree / cannot tell (report.py, stats.py). A stage
whose output is in DIR is reused.
"""

from cpt_jax.demo.command import main, run

__all__ = ["main", "run"]
