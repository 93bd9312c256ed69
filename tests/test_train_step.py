"""The update: accumulated micro-batches equal the full batch; non-finite steps change nothing."""

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import config, model, optim, schedules, train_step

C = model.ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=64, max_seq_len=32,
                      dtype="float32")


def _setup():
    cfg = config.default_config()
    cfg.schedule.name, cfg.schedule.start_lr = "recipe", 1e-3
    sched = schedules.build(cfg.schedule, 10, 1e-3)
    tx = optim.build(cfg.optim)
    state = train_step.init_state(model.init_params(C, 0), tx)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, C.vocab_size, size=(8, 17))
    mask = np.ones((8, 16), np.float32)
    mask[::3, 5:] = 0  # unequal token counts per row: a mean of micro-batch means would differ
    batch = {
        "inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
        "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
        "segment_ids": jnp.ones((8, 16), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(16, dtype=jnp.int32), (8, 16)),
        "loss_mask": jnp.asarray(mask),
    }
    return sched, tx, state, batch


def test_micro_batches_give_the_full_batch_update():
    sched, tx, state, batch = _setup()
    full = jax.jit(train_step.make_train_step(C, tx, sched, micro_batches=1))
    acc = jax.jit(train_step.make_train_step(C, tx, sched, micro_batches=4))
    s1, m1 = full(state, batch)
    s4, m4 = acc(state, batch)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-6)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s4["params"]), jax.tree.leaves(s1["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_nonfinite_step_leaves_params_and_optimizer_untouched():
    sched, tx, state, batch = _setup()
    step = jax.jit(train_step.make_train_step(C, tx, sched, nan_steps=(0,)))
    new, metrics = step(state, batch)
    assert not bool(metrics["finite"])
    assert int(new["step"]) == 1
    for a, b in zip(jax.tree.leaves((new["params"], new["opt_state"])),
                    jax.tree.leaves((state["params"], state["opt_state"])), strict=True):
        np.testing.assert_array_equal(a, b)


def test_lr_follows_the_global_step():
    sched, tx, state, batch = _setup()
    step = jax.jit(train_step.make_train_step(C, tx, sched))
    state = dict(state, step=jnp.asarray(7, jnp.int32))
    _, metrics = step(state, batch)
    assert float(metrics["lr"]) == float(sched.fn(7))
