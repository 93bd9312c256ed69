"""MaxText's side of the peer benchmark; runs in MaxText's own virtualenv (benchmarks/peers/install_maxtext.sh).

    .peers/maxtext/bin/python benchmarks/peers/maxtext_side.py RUN_JSON

Builds the run the way MaxText's own `train_loop` does (`train.initialize` on base.yml and the
overrides of shapes.maxtext_overrides, `train_utils.setup_train_loop`, `jit_train_and_eval_step`
with MaxText's `train_step`, an ahead-of-time compile of it) and times its steps on the batch of
MaxText's synthetic loader, exactly as common.time_steps times cpt_jax's. Prints one line,
`RESULT {json}`, that benchmarks/peers/compare.py reads.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

T0 = float(os.environ.get("PEER_T0", time.time()))  # when the parent started this process
os.environ.setdefault("DECOUPLE_GCLOUD", "TRUE")  # no Google Cloud clients: MaxText's supported local mode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import jax  # noqa: E402
import maxtext  # noqa: E402
import shapes  # noqa: E402
from flax import nnx  # noqa: E402
from flax.linen import partitioning as nn_partitioning  # noqa: E402
from maxtext.trainers.pre_train import train as mt_train  # noqa: E402
from maxtext.utils import maxtext_utils, sharding, train_utils  # noqa: E402


def main(run_json: str) -> dict:
    run = shapes.Run(**json.loads(run_json))
    base_yml = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
    hardware = "cpu" if jax.default_backend() == "cpu" else "gpu"
    with tempfile.TemporaryDirectory() as out:
        config, recorder = mt_train.initialize(["train", base_yml, *shapes.maxtext_overrides(run, out, hardware)])
        (_, _, state_mesh_shardings, _, mesh, _, _, data_loader, rampup_manager, _, state) = (
            train_utils.setup_train_loop(config, recorder))
        # As train_loop: the NNX train state split into its graph and its arrays, then jitted.
        jit_model, state = nnx.split(state)
        params_shardings, state_mesh_shardings = sharding.maybe_update_params_sharding_with_opt(
            config, state_mesh_shardings)
        p_train_step, _ = train_utils.jit_train_and_eval_step(
            config, jit_model, mesh, state, state_mesh_shardings, mt_train.train_step,
            params_shardings=params_shardings)
        with jax.set_mesh(mesh), nn_partitioning.axis_rules(config.logical_axis_rules):
            shaped_batch = maxtext_utils.get_shaped_batch(
                config, batch_sharding=sharding.get_input_data_sharding(config, mesh))
            t = time.perf_counter()
            compiled = p_train_step.lower(state, shaped_batch).compile()
            compile_sec = time.perf_counter() - t
            n_params = sum(x.size for x in _params(jit_model, state))
            batch = data_loader.load_next_batch(rampup_manager=rampup_manager)

            def step(state):
                state, metrics = compiled(state, batch)
                return state, metrics["scalar"]["learning/loss"]

            timing = common.time_steps(step, state, run, T0)
    return {"side": "maxtext", "params": int(n_params), "compile_sec": compile_sec,
            **common.memory_figures(compiled), **timing}


def _params(graphdef, state) -> list:
    """The model's trainable parameters out of MaxText's NNX train state."""
    train_state = nnx.merge(graphdef, state)
    return jax.tree.leaves(nnx.state(train_state.model, nnx.Param))


if __name__ == "__main__":
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
