"""The jitted update: loss, gradients (optionally accumulated over micro-batches), AdamW step.

The train state is a plain pytree {'step', 'params', 'opt_state'}: everything a resumed run needs
besides the config. A step whose loss or gradient norm is not finite leaves params and optimizer
state untouched (the step counter still advances: the data and the LR follow the step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from cpt_jax import losses, model, sharding
from cpt_jax.data.pipeline import BATCH_KEYS, batch_specs
from cpt_jax.model import ModelConfig
from cpt_jax.schedules import Schedule

State = dict[str, Any]
Batch = dict[str, jax.Array]


def init_state(params: Any, tx: optax.GradientTransformation) -> State:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(c: ModelConfig, param_shardings: Any, mesh: jax.sharding.Mesh, tx: optax.GradientTransformation
                   ) -> tuple[State, State]:
    """(the abstract state, every leaf with its sharding; the state's shardings); allocates nothing.

    Call it outside `jax.set_mesh` of a compile-only mesh: optax builds the optimizer state's
    structure with a few eager ops on the default device.
    """
    with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    abstract_params = jax.tree.map(with_sharding, model.abstract_params(c), param_shardings)
    # Every copy of the parameter tree inside the optimizer state (Adam's moments) is sharded like
    # the parameters; counters and other scalars are replicated.
    plain_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, plain_opt, param_shardings, transform_non_params=lambda _: sharding.replicated(mesh)
    )
    shardings = {"step": sharding.replicated(mesh), "params": param_shardings, "opt_state": opt_shardings}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings["step"]), "params": abstract_params,
                "opt_state": jax.tree.map(with_sharding, plain_opt, opt_shardings)}
    return abstract, shardings


def _grads(loss_sum, params, batch: Batch, micro_batches: int):
    """(loss sum, token count, gradient of the sum) over the whole batch."""
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    if micro_batches == 1:
        total, grads = jax.value_and_grad(loss_sum)(params, batch)
        return total, count, grads

    def split(x):
        # Micro-batch m takes rows m, m+M, m+2M, ...: every device holds a share of each one, so
        # accumulation does not idle devices the way contiguous row blocks would.
        return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    def body(carry, mb):
        total, acc = carry
        value, g = jax.value_and_grad(loss_sum)(params, mb)
        return (total + value, jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (total, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), jax.tree.map(split, batch))
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    return total, count, grads


def make_train_step(c: ModelConfig, tx: optax.GradientTransformation, schedule: Schedule, rules: tuple = (),
                    micro_batches: int = 1, chunk_tokens: int = 0, nan_steps: tuple[int, ...] = ()
                    ) -> Callable[[State, Batch], tuple[State, dict[str, jax.Array]]]:
    """The pure step function (`lower` jits it with a run's shardings).

    nan_steps poisons those steps' gradients with NaN: a test hook for the non-finite guard.
    """

    def loss_sum(params, batch):  # the summed token loss (fp32)
        hidden = model.forward(params, batch["inputs"], c, batch["segment_ids"], batch["positions"], rules)
        w = model.head_weights(params, c)
        return losses.cross_entropy_sum(hidden, w, batch["targets"], batch["loss_mask"], c.dtype, chunk_tokens)

    def step_fn(state: State, batch: Batch):
        params, step = state["params"], state["step"]
        total, count, grads = _grads(loss_sum, params, batch, micro_batches)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        if nan_steps:
            poisoned = jnp.isin(step, jnp.asarray(nan_steps, jnp.int32))
            grads = jax.tree.map(lambda g: jnp.where(poisoned, jnp.nan, g), grads)
        loss = total / denom
        grad_norm = optax.tree.norm(grads)
        lr = schedule.fn(step)
        opt_state = state["opt_state"]
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = jax.tree.map(lambda p, u: (p - lr * u.astype(jnp.float32)).astype(p.dtype), params, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "loss_tokens": count, "finite": finite}
        return {"step": step + 1, "params": keep(new_params, params), "opt_state": keep(new_opt, opt_state)}, metrics

    return step_fn


def lower(train_cfg: Any, c: ModelConfig, tx: optax.GradientTransformation, schedule: Schedule, rules: dict,
          state: State, state_shardings: State, batch_sharding: jax.sharding.NamedSharding) -> jax.stages.Lowered:
    """The step of a run (its `train` config section) lowered for `state` and a batch of the run's
    shape: the state in and out sharded as `state_shardings`, every batch field as `batch_sharding`,
    the metrics replicated, and the incoming state donated (its buffers become the new state's)."""
    step_fn = make_train_step(c, tx, schedule, sharding.rules_tuple(rules), train_cfg.micro_batches,
                              train_cfg.loss_chunk_tokens, tuple(train_cfg.inject_nan_steps))
    jitted = jax.jit(step_fn, in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
                     out_shardings=(state_shardings, sharding.replicated(batch_sharding.mesh)), donate_argnums=(0,))
    return jitted.lower(state, batch_specs(train_cfg.batch_size, train_cfg.seq_len, batch_sharding))
