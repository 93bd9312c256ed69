"""Attention with document masks: cuDNN's fused kernel against XLA's, forward and backward.

    python benchmarks/attention.py [--batch 4] [--seq 4096] [--heads 32] [--kv_heads 8] [--head_dim 128] [--docs 4]

The model's own attention (`cpt_jax.model._attention`: causal within each packed document) on
random bf16 inputs whose rows hold `--docs` documents of random lengths. For each implementation
that runs on this machine ('xla' everywhere, 'cudnn' on NVIDIA GPUs):
  - error: ||out - ref|| / ||ref|| of the output and of the gradients of q, k, v, where ref is XLA
    on the same inputs upcast to float32 (bf16 operands land between 1e-3 and 1e-2);
  - time: median milliseconds of a jitted forward + backward.
Prints a table and returns it; exits non-zero if an implementation's error exceeds 2e-2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cpt_jax import model  # noqa: E402

TOLERANCE = 2e-2


def _segment_ids(rng: np.random.Generator, batch: int, seq: int, docs: int) -> np.ndarray:
    """Rows of `docs` documents of random lengths (ids 1..docs, in order, as packing makes them)."""
    ids = np.empty((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=docs - 1, replace=False)) if docs > 1 else []
        ids[b] = np.searchsorted(cuts, np.arange(seq), side="right") + 1
    return ids


def _loss_and_grads(impl: str, c: model.ModelConfig):
    cfg = dataclasses.replace(c, attention=impl)

    def loss(q, k, v, seg, w):
        out = model._attention(q, k, v, seg, cfg)
        return jnp.sum(out.astype(jnp.float32) * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--docs", type=int, default=4, help="documents packed in each row")
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)

    B, T, N, K, H = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    c = model.ModelConfig(n_layers=1, d_model=N * H, n_heads=N, n_kv_heads=K, d_ff=4, vocab_size=8,
                          max_seq_len=T, dtype="bfloat16")
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    w = jnp.asarray(rng.standard_normal((B, T, N, H)), jnp.float32)  # a loss that weighs every output
    seg = jnp.asarray(_segment_ids(rng, B, T, args.docs))

    f32 = dataclasses.replace(c, dtype="float32")
    (_, ref), ref_grads = _loss_and_grads("xla", f32)(*(x.astype(jnp.float32) for x in (q, k, v)), seg, w)
    impls = ["xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    rows = {}
    for impl in impls:
        fn = _loss_and_grads(impl, c)
        (_, out), grads = fn(q, k, v, seg, w)
        errors = {"out": _relative(out, ref), **{f"d{n}": _relative(g, r) for n, g, r in zip("qkv", grads, ref_grads,
                                                                                          strict=True)}}
        times = []
        for _ in range(args.repeats + 2):
            t = time.perf_counter()
            jax.block_until_ready(fn(q, k, v, seg, w))
            times.append(time.perf_counter() - t)
        rows[impl] = {"errors": errors, "ms": 1000 * statistics.median(times[2:])}
    print(f"attention B={B} T={T} heads={N} kv_heads={K} head_dim={H}, {args.docs} documents per row, "
          f"{jax.devices()[0].device_kind}")
    print(f"{'impl':6} {'fwd+bwd ms':>11}  " + "  ".join(f"{'err ' + n:>9}" for n in ("out", "dq", "dk", "dv")))
    for impl, r in rows.items():
        print(f"{impl:6} {r['ms']:11.2f}  " + "  ".join(f"{e:9.2e}" for e in r["errors"].values()))
    if "cudnn" not in rows:
        print("cudnn: not checked (no NVIDIA GPU here)")
    bad = [i for i, r in rows.items() if max(r["errors"].values()) > TOLERANCE]
    if bad:
        sys.exit(f"error: {', '.join(bad)} differ from the float32 reference by more than {TOLERANCE}")
    return rows


if __name__ == "__main__":
    main()
