"""Per-device memory of the real train step on TPU slices, compiled here without a TPU (libtpu).

    python benchmarks/tpu_memory.py [--rows PRESET:TOPOLOGY:BATCH:REMAT,...]

Each row is what `python -m cpt_jax.train --config configs/PRESET.py --workdir W --compile_only
--topology TOPOLOGY --config.train.batch_size=BATCH --config.model.remat=REMAT` reports
(cpt_jax.aot.compile_only): the step compiled for the slice by libtpu's compiler, its memory per
device, and whether it fits the chip's HBM (the TPU compiler refuses a step that does not).
Sequence length: the preset's (4096 for these). Prints a Markdown table and returns the rows.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for the TPU, run nothing: this host's CPU is JAX's backend
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpt_jax import aot, cli, resolve  # noqa: E402

DEFAULT_ROWS = (
    "1b:v5p-8:8:none",
    "1b:v5p-8:8:full",
    "llama2_7b:v5p-8:8:full",
    "llama3_8b:v5p-8:8:full",
    "llama3_8b:v5p-128:64:none",
    "llama3_8b:v5p-128:64:full",
    "llama3_8b:v5e-16:16:full",
    "nemotron4_15b:v5p-128:64:full",
)


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def row(spec: str) -> dict:
    preset, topology, batch, remat = spec.split(":")
    cfg, _ = cli.parse(["x", f"--config=configs/{preset}.py", f"--config.train.batch_size={batch}",
                        f"--config.model.remat={remat}"])
    report = aot.compile_only(resolve.for_compile(cfg, "/tmp/cpt_jax_tpu_memory_unused"), topology)
    m = report["memory_per_device"] or {}
    return {"preset": preset, "topology": topology, "chips": report["devices"], "batch": int(batch),
            "seq_len": int(cfg.train.seq_len), "remat": remat, "params": report["params"],
            "argument_bytes": m.get("argument_bytes"), "temp_bytes": m.get("temp_bytes"),
            "total_bytes": m.get("total_bytes"), "peak_bytes": m.get("peak_bytes"), "fits": report["fits"],
            "refusal": report["refusal"],
            "compile_secs": report["compile_secs"]}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="PRESET:TOPOLOGY:BATCH:REMAT,...")
    args = p.parse_args(argv)
    rows = []
    print("| preset | topology (chips) | batch x seq | remat | per device GiB: arguments / temporaries / total / "
          "XLA's peak | fits |")
    print("|---|---|---|---|---|---|")
    for spec in filter(None, args.rows.split(",")):
        r = row(spec)
        rows.append(r)
        if r["fits"]:
            fits = "yes"
        else:
            refusal = r["refusal"] or ""
            # The TPU compiler's refusal names the temporaries' size as "temporaries (N)"; other
            # refusals say nothing about it, and the table then shows only "no".
            needed = refusal.split("temporaries (", 1)[1].split(")")[0] if "temporaries (" in refusal else ""
            fits = f"**no**: temporaries alone need {needed}" if needed else "**no**"
        print(f"| {r['preset']} ({r['params'] / 1e9:.2f}B) | {r['topology']} ({r['chips']}) | "
              f"{r['batch']} x {r['seq_len']} | {r['remat']} | {_gib(r['argument_bytes'])} / {_gib(r['temp_bytes'])} / "
              f"{_gib(r['total_bytes'])} / {_gib(r['peak_bytes'])} | {fits} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
