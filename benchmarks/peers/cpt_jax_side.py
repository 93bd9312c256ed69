"""cpt_jax's side of the peer benchmark; runs in the project's virtualenv.

    .venv/bin/python benchmarks/peers/cpt_jax_side.py RUN_JSON

Builds the run the way `python -m cpt_jax.train` does (configs/tiny.py with the overrides of
shapes.cpt_jax_overrides, `resolve.for_training`, the jitted `train_step.lower` with
donated state, an ahead-of-time compile of it, `resolve.initial_state`: benchmarks/throughput.py's
`prepare`) and times its steps on the
first batch of the synthetic pipeline, exactly as common.time_steps times MaxText's. Prints one
line, `RESULT {json}`, that benchmarks/peers/compare.py reads.
"""

from __future__ import annotations

import json
import os
import sys
import time

T0 = float(os.environ.get("PEER_T0", time.time()))  # when the parent started this process

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import common  # noqa: E402
import jax  # noqa: E402
import shapes  # noqa: E402
from throughput import prepare  # noqa: E402

from cpt_jax import cli, sharding  # noqa: E402


def main(run_json: str) -> dict:
    run = shapes.Run(**json.loads(run_json))
    cfg, _ = cli.parse(["peer", "--config=configs/tiny.py", *shapes.cpt_jax_overrides(run)])
    with jax.set_mesh(sharding.make_mesh(cfg.mesh)):
        built, compiled, compile_sec, state, batch = prepare(cfg)

        def step(state):
            state, metrics = compiled(state, batch)
            return state, metrics["loss"]

        timing = common.time_steps(step, state, run, T0)
    return {"side": "cpt_jax", "params": int(built.model_config.num_params()), "compile_sec": compile_sec,
            **common.memory_figures(compiled), **timing}


if __name__ == "__main__":
    os.chdir(os.path.dirname(os.path.dirname(HERE)))  # configs/ is named relative to the repository
    print("RESULT " + json.dumps(main(sys.argv[1])), flush=True)
