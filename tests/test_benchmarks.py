"""Every benchmark runs in a tiny mode and returns finite figures, so none of them can rot.

The figures themselves are not asserted against targets here: timings on a shared CI machine are
noise. BENCHMARKS.md records the real runs.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_TRAIN = ["--config=configs/tiny.py", "--config.model.n_layers=2", "--config.model.d_model=64",
              "--config.model.d_ff=128", "--config.model.vocab_size=128", "--config.train.batch_size=8",
              "--config.train.seq_len=32", "--config.schedule.warmup_steps=1"]


def _benchmark(name):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite_positive(*values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values)


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the benchmarks name configs/ relative to the repository


def test_throughput(capsys, tmp_path):
    r = _benchmark("throughput").main(["--steps=2", f"--profile={tmp_path}", f"--json={tmp_path}/t.json", *TINY_TRAIN])
    assert _finite_positive(r["compile_sec"], r["step_sec"], r["tokens_per_sec"], r["tflops_per_device"])
    assert r["mfu"] is None  # no peak FLOP/s is known for a CPU: never a made-up MFU
    assert "tokens/s" in capsys.readouterr().out
    assert r["profile"]["top_ops"] and sum(r["profile"]["categories"].values()) == pytest.approx(1)
    assert json.load(open(tmp_path / "t.json"))["tokens_per_sec"] == r["tokens_per_sec"]


def test_throughput_depth():
    r = _benchmark("throughput").main(["--depth", "--depth_layers=1,3", *TINY_TRAIN])
    assert _finite_positive(r["scan_ratio"], r["unrolled_ratio"])
    assert set(r["compile_sec"]) == {"scan_1", "scan_3", "unrolled_1", "unrolled_3"}


def test_throughput_loss_memory():
    r = _benchmark("throughput").main(["--loss_memory", "--loss_shape=4096,256,64,64"])
    assert _finite_positive(r["plain_bytes"], r["chunked_bytes"]) and r["ratio"] < 1


def test_end_to_end():
    r = _benchmark("end_to_end").main(["--steps=4", "--repeats=1", *TINY_TRAIN])
    assert _finite_positive(r["synthetic_tokens_per_sec"], r["end_to_end_tokens_per_sec"], r["ratio"])


def test_checkpoint():
    r = _benchmark("checkpoint").main(["--steps=3", "--repeats=1", *TINY_TRAIN])
    assert _finite_positive(r["never_steps_per_sec"], r["every_steps_per_sec"], r["slowdown"], r["write_ms_per_save"],
                            r["start_ms_per_save"], r["restore_ms"])
    assert r["wait_ms_per_save"] >= 0


def test_data_loader():
    r = _benchmark("data_loader").main(["--seq_len=64", "--batch=8", "--examples=64", "--sources=2", "--rounds=1",
                                        "--steps=6", "--settings=1:0,2:0"])
    assert set(r["tokens_per_sec"]) == {"1:0", "2:0"}
    assert _finite_positive(*r["tokens_per_sec"].values(), r["best_tokens_per_sec"])


def test_prepare_throughput():
    r = _benchmark("prepare_throughput").main(["--docs=300", "--words=60", "--seq_len=64", "--vocab_size=400",
                                               "--repeats=1"])
    assert _finite_positive(r["bare_tokens_per_sec"], r["prepare_tokens_per_sec"], r["ratio"])


def test_attention():
    rows = _benchmark("attention").main(["--batch=1", "--seq=64", "--heads=4", "--kv_heads=2", "--head_dim=16",
                                         "--repeats=1"])
    assert max(rows["xla"]["errors"].values()) < 2e-2 and _finite_positive(rows["xla"]["ms"])


def test_gpu_script_runs_its_calls_in_tiny_mode(tmp_path):
    """benchmarks/gpu_h200.sh (the H200 figures) with a tiny model on this machine's devices."""
    from test_launch import shellcheck

    lint = subprocess.run([shellcheck(), "-x", "--shell=bash", "benchmarks/gpu_h200.sh"], cwd=REPO,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    env = dict(os.environ, CPT_BENCH_TINY="1", PYTHON=sys.executable)
    done = subprocess.run(["bash", "benchmarks/gpu_h200.sh", str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {"devices.txt", "attention.txt", "1b.json", "1b_cudnn.json", "7b.json", "end_to_end_1b.txt"} <= set(
        os.listdir(tmp_path))
    table = done.stdout.strip().splitlines()
    assert table[-4].split()[:2] == ["preset", "params"] and table[-2].startswith("1b_cudnn")
    assert table[-1].startswith("7b")


# ----------------------------------------------------------------------------- the peer benchmark (MaxText)


def _peer_compare():
    spec = importlib.util.spec_from_file_location("peer_compare", os.path.join(REPO, "benchmarks", "peers",
                                                                                "compare.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_benchmark_dry_run_prints_both_sides_and_every_difference(capsys, tmp_path):
    """Without MaxText (its install needs the network): the settings, the equal parameter counts, the differences."""
    from cpt_jax import cli, config, model

    compare = _peer_compare()
    venv = tmp_path / "maxtext_venv"
    r = compare.main(["--dry_run", "--shapes=tiny,llama6_32k", f"--maxtext_venv={venv}"])
    out = capsys.readouterr().out
    assert not venv.exists(), "a dry run installs nothing"
    assert [run["name"] for run in r["runs"]] == ["tiny", "llama6_32k"]
    assert len(compare.DIFFERENCES) >= 5 and r["differences"] == list(compare.DIFFERENCES)
    assert all(f"  {i}. {d}" in out for i, d in enumerate(compare.DIFFERENCES, 1))
    for run in r["runs"]:
        shape = compare.shapes.Run(**run)
        assert run["dtype"] == "float32" and run["remat"] == "full"  # a CPU host's defaults
        assert "--config.model.remat=full" in out and "remat_policy=full" in out
        # What cpt_jax's config makes of its side's flags is the decoder MaxText is given, parameter for parameter.
        cfg, _ = cli.parse(["x", "--config=configs/tiny.py", *compare.shapes.cpt_jax_overrides(shape)])
        config.validate(cfg)
        assert model.ModelConfig.from_config(cfg.model).num_params() == compare.shapes.params(shape)
        assert f"{run['name']}: {compare.shapes.params(shape):,} parameters" in out
        assert cfg.train.batch_size * cfg.train.seq_len == shape.tokens_per_step
    assert compare.shapes.params(compare.shapes.make_run("tiny")) == 918_656  # cpt_jax's tiny preset


@pytest.mark.parametrize("argv, expected", [
    (["--shapes=huge"], "error: --shapes: 'huge', expected some of tiny, llama6_32k"),
    (["--remat=none"], "error: --remat: 'none', expected one of full, save_dots (MaxText rematerialises every "
                       "scanned block, so 'none' has no counterpart there)"),
    (["--pairs=0"], "error: --pairs 0 --steps 10: expected both >= 1"),
    (["--dtype=float16"], "error: --dtype: 'float16', expected float32 or bfloat16"),
])
def test_peer_benchmark_bad_arguments(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_:
        _peer_compare().main(["--dry_run", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == expected


def test_peer_benchmark_cpt_jax_side_runs_on_one_device():
    """The cpt_jax half of a pair, as the benchmark starts it (fresh process, one device, no compilation cache)."""
    compare = _peer_compare()
    run = compare.shapes.make_run("tiny", steps=1, batch=2, seq_len=32, remat="save_dots")
    r = compare.run_side(sys.executable, "cpt_jax_side.py", run, compare.child_env("cpu"), None)
    assert r["side"] == "cpt_jax" and r["device"] == "1 x cpu" and r["params"] == compare.shapes.params(run)
    assert _finite_positive(r["tokens_per_sec"], r["step_sec"], r["cpu_sec"], r["compile_sec"], r["first_step_sec"],
                            r["plan_bytes"], r["peak_rss_bytes"], r["loss_first"])
    assert r["first_step_sec"] > r["compile_sec"]
