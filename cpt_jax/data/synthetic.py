"""A deterministic generated token stream with learnable structure (no files needed).

Each example is a walk on a fixed random graph over the vocabulary: every token has `branching`
possible successors, chosen uniformly. A model that learns the graph reaches a loss of
ln(branching), far below the ln(vocab_size) of an untrained one, so the loss falls quickly and
measurably. Example `i` depends only on (seed, i): the same global example on any topology.
"""

from __future__ import annotations

import numpy as np


class SyntheticWalks:
    """A grain batch function: a batch of draws (global example indices) -> their examples, int32
    [len(indices), seq_len + 1].

    Generates all rows at once: a walk is sequential in time, so generating one example at a time
    would cost seq_len numpy steps per row instead of per batch. The graph is drawn once, here
    (at a vocabulary of 32k, drawing it took about as long as a batch's walks).
    """

    def __init__(self, seed: int, seq_len: int, vocab_size: int, branching: int):
        self.seed, self.seq_len = int(seed), int(seq_len)
        # [vocab_size, branching] successors of every token, fixed by the seed.
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.table = rng.integers(0, int(vocab_size), size=(int(vocab_size), int(branching)), dtype=np.int64)

    def __call__(self, indices) -> np.ndarray:
        vocab_size, branching = self.table.shape
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.seq_len + 1), dtype=np.int32)
        choices = np.empty((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            # One generator per example: rows are independent of which process or batch asks.
            rng = np.random.default_rng([self.seed, int(i)])
            out[row, 0] = rng.integers(0, vocab_size)
            choices[row] = rng.integers(0, branching, size=self.seq_len)
        for t in range(self.seq_len):
            out[:, t + 1] = self.table[out[:, t], choices[:, t]]
        return out
