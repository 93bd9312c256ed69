"""The recipe end to end on generated data, as evidence: `python -m cpt_jax.demo`.

    python -m cpt_jax.demo [--workdir DIR] [--scale tiny|small|medium] [--seeds N]
                           [--ablations all|switch,floor,warmup]

Per seed (everything is repeated for each, corpus included):
  corpus     biographies of two disjoint populations (A: pretraining, B: the new domain), QA pairs
             about A, and three multiple-choice tasks: retention (A's facts), acquisition (B's facts),
             held-out QA (questions about B, never asked in training)            (corpus.py)
  data       a sentencepiece tokenizer and the prepared sources A, B, qa (cpt_jax.data.packing)
  base       pretraining on A (warmup + cosine) until its validation loss has flattened
  runs       continued runs from the base checkpoint, the same token budget each (runs.py):
               baseline  A only, the recipe's LR schedule
               recipe    cosine from the base's final LR to 1/100, General Blend (A+B), then the QA
                         Blend (A+B+qa) once the LR reaches start/5
               rewarm    warmup back to the base's peak LR, then as the recipe
             and, with --ablations, the variants of the paper's other questions; each run is planned
             (cpt_jax.plan), trained (cpt_jax.train) and scored question by question (cpt_jax.evaluate)
Then DIR/report.md and DIR/report.png: the base's plateau, accuracies pooled over seeds with 95%
intervals, paired differences, and the paper's four questions answered agree / disagree / cannot
tell (report.py, stats.py). A stage whose output is in DIR is reused.
"""

from cpt_jax.demo.command import main, run

__all__ = ["main", "run"]
