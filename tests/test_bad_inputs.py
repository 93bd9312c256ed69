"""The catalogue of wrong inputs: each gets one line naming the key or file, exit status 2 (the
README's promise for a mistake in the config, the data or a checkpoint), no traceback, and leaves the
workdir, every checkpoint and every data directory byte-identical."""

import json
import os
import shutil
import subprocess

import data_helpers
import pytest
from train_helpers import SMALL_MODEL

from cpt_jax import checkpoint, model, prepare, train

SMALL = [
    *SMALL_MODEL,
    "--config.schedule.warmup_steps=1",
    "--config.train.steps=4",
    "--config.checkpoint.every_steps=2",
]

MIXTURE_CONFIG = """
from cpt_jax.presets import preset_config

def get_config():
    c = preset_config("tiny")
    c.model.update(n_layers=2, d_model=64, d_ff=128, vocab_size=320)
    c.train.update(steps=20, batch_size=8, seq_len=32)
    c.schedule.name, c.schedule.start_lr = "recipe", 1e-3
    c.tensorboard = False
    c.data.kind = "mixture"
    c.data.tokenizer = {tokenizer!r}
    c.data.sources.general = {general!r}
    c.data.sources.qa = {qa!r}
    c.data.phases = {phases}
    return c
"""
GOOD_PHASES = (
    "(dict(weights=dict(general=1.0, qa=0.0)), "
    "dict(weights=dict(general=0.5, qa=0.5), start_at=dict(lr_ratio=0.2)))"
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A pretrained checkpoint, a tokenizer and two prepared sources: the things wrong inputs point at."""
    root = tmp_path_factory.mktemp("world")
    pretrained = str(root / "pretrained")
    assert train.main(["train", *SMALL, f"--workdir={pretrained}"]) == 0
    tok = data_helpers.make_sentencepiece(root)
    general = data_helpers.make_prepared_source(root, tok, seq_len=32, name="general")
    qa = data_helpers.make_prepared_source(root, tok, data_helpers.make_documents(80, seed=9), seq_len=32, name="qa")
    return {"root": root, "pretrained": pretrained, "ckpts": os.path.join(pretrained, "checkpoints"), "tok": tok,
            "general": general, "qa": qa}


def _snapshot(*paths):
    out = {}
    for path in paths:
        if not os.path.exists(path):
            out[path] = None
            continue
        for root, dirs, files in os.walk(path):
            out[root] = sorted(dirs)
            for f in files:
                p = os.path.join(root, f)
                with open(p, "rb") as fh:
                    out[p] = fh.read()
    return out


def _mixture_file(world, tmp_path, phases=GOOD_PHASES, **paths):
    values = {"tokenizer": world["tok"], "general": world["general"], "qa": world["qa"], **paths}
    f = tmp_path / "mix.py"
    f.write_text(MIXTURE_CONFIG.format(phases=phases, **values))
    return f"--config={f}"


def _copy_source(world, tmp_path, edit):
    """A copy of the 'qa' source with its manifest edited by `edit(manifest)` (None: deleted)."""
    target = str(tmp_path / "qa_copy")
    shutil.copytree(world["qa"], target)
    path = os.path.join(target, "manifest.json")
    manifest = json.load(open(path))
    if edit is None:
        os.remove(path)
    else:
        edit(manifest)
        json.dump(manifest, open(path, "w"))
    return target


def _truncated_shard(world, tmp_path):
    """A copy of the 'qa' source whose train shard lost its second half."""
    target = _copy_source(world, tmp_path, lambda m: None)
    shard = os.path.join(target, json.load(open(os.path.join(target, "manifest.json")))["shards"][0])
    os.truncate(shard, os.path.getsize(shard) // 2)
    return target


def _with_lr_min_removed(world, tmp_path):
    step_dir = tmp_path / "ckpt" / "4"
    shutil.copytree(os.path.join(world["ckpts"], "4"), step_dir)
    meta_file = step_dir / "_CHECKPOINT_METADATA"  # orbax's step metadata; ours is its custom_metadata
    meta = json.loads(meta_file.read_text())
    del meta["custom_metadata"]["lr_min"]
    meta_file.write_text(json.dumps(meta))
    return str(step_dir)


def _without_optimizer_state(world, tmp_path):
    """The pretrained parameters saved as an import saves them: no optimizer state."""
    meta = checkpoint.read_metadata(world["ckpts"])
    abstract = model.abstract_params(model.ModelConfig.from_config(meta["model"]))
    params = checkpoint.restore_from(world["ckpts"], params=abstract)["params"]
    root = str(tmp_path / "imported" / "checkpoints")
    checkpoint.write(root, 0, {"params": params}, dict(meta, step=0))
    return root


def _other_run_workdir(world, tmp_path):
    other = str(tmp_path / "other_run")
    shutil.copytree(world["pretrained"], other)
    return other


def _file_with(tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    return str(f)


# Each case: (id, argv builder (world, tmp_path) -> (argv for train.main, workdir), expected text in the line).
CASES = [
    ("unknown override key", lambda w, t: (SMALL + ["--config.train.stepz=5"], None),
     "config key 'train.stepz': unknown key; did you mean train.steps"),
    ("unknown key in config file", lambda w, t: ([
        "--config=" + _file_with(t, "typo.py", "from cpt_jax.presets import preset_config\n"
                                 "def get_config():\n    c = preset_config('tiny')\n    c.optim.lr = 1.0\n"
                                 "    return c\n")], None), "config key 'optim.lr': unknown key"),
    ("config file syntax error", lambda w, t: (["--config=" + _file_with(t, "bad.py", "def get_config(:\n")],
                                               None), "--config: SyntaxError"),
    ("config file missing", lambda w, t: (["--config=/no/such/config.py"], None), "--config"),
    ("missing workdir", lambda w, t: (["--config=configs/tiny.py"], "none"), "--workdir: missing"),
    ("non-positive start lr", lambda w, t: (SMALL + ["--config.schedule.name=recipe",
                                                     "--config.schedule.start_lr=-1e-4"], None), "schedule.start_lr"),
    ("final ratio above 1", lambda w, t: (SMALL + ["--config.schedule.name=recipe", "--config.schedule.start_lr=1e-4",
                                                   "--config.schedule.final_ratio=1.5"], None), "schedule.final_ratio"),
    ("warmup longer than the run", lambda w, t: (SMALL + ["--config.schedule.warmup_steps=50"], None),
     "schedule.warmup_steps"),
    ("unknown schedule", lambda w, t: (SMALL + ["--config.schedule.name=cyclic"], None), "schedule.name"),
    ("mesh product not the device count", lambda w, t: (SMALL + ["--config.mesh.data=3", "--config.mesh.fsdp=2"],
                                                         None), "expected the device count 8"),
    ("two inferred mesh axes", lambda w, t: (SMALL + ["--config.mesh.data=-1"], None), "at most one axis set to -1"),
    ("mesh rule naming an unknown axis", lambda w, t: (SMALL + ["--config.mesh.rules=('mlp=model',)"], None),
     "mesh.rules"),
    ("heads not divisible by kv heads", lambda w, t: (SMALL + ["--config.model.n_kv_heads=3"], None),
     "model.n_heads: 4 is not divisible by model.n_kv_heads 3"),
    ("d_model not divisible by heads", lambda w, t: (SMALL + ["--config.model.d_model=66"], None), "model.d_model"),
    ("seq_len above the model maximum", lambda w, t: (SMALL + ["--config.train.seq_len=1024"], None),
     "train.seq_len: 1024, expected at most model.max_seq_len 256"),
    ("batch not divisible by data parallelism", lambda w, t: (SMALL + ["--config.train.batch_size=12"], None),
     "does not split over the 8 data-parallel devices"),
    ("micro-batches not dividing the batch", lambda w, t: (SMALL + ["--config.train.micro_batches=3"], None),
     "train.micro_batches"),
    ("unknown mlp", lambda w, t: (SMALL + ["--config.model.mlp=gelu"], None), "model.mlp: 'gelu'"),
    ("cuDNN attention on CPU devices", lambda w, t: (SMALL + ["--config.model.attention=cudnn"], None),
     "model.attention: 'cudnn' on cpu devices, expected 'auto' or 'xla' (cuDNN's fused attention runs on NVIDIA "
     "GPUs only)"),
    ("cuDNN attention for a TPU slice", lambda w, t: (SMALL + ["--config.model.attention=cudnn", "--compile_only",
                                                               "--topology=v5p-8"], None),
     "model.attention: 'cudnn' on tpu devices"),
    ("adam beta2 of 1", lambda w, t: (SMALL + ["--config.optim.b2=1.0"], None), "optim.b2"),
    ("init_from missing", lambda w, t: (SMALL + ["--config.init_from=/does/not/exist"], None),
     "init_from: /does/not/exist does not exist"),
    ("init_from not a checkpoint", lambda w, t: (SMALL + [f"--config.init_from={t}"], None),
     "holds no complete cpt_jax checkpoint"),
    ("init_from without lr_min", lambda w, t: (SMALL + ["--config.schedule.name=recipe",
                                                        f"--config.init_from={_with_lr_min_removed(w, t)}"], None),
     "has no lr_min in its metadata"),
    ("init_from of another model", lambda w, t: (SMALL + [f"--config.init_from={w['ckpts']}",
                                                          "--config.model.d_ff=192"], None),
     "parameter layers.w_down has shape (2, 128, 64) in the checkpoint, the model config expects shape (2, 192, 64)"),
    ("init_from_optimizer without optimizer state", lambda w, t: (
        SMALL + [f"--config.init_from={_without_optimizer_state(w, t)}", "--config.init_from_optimizer=True"], None),
     "has no optimizer state (an imported model has none)"),
    ("init_from a pickle file", lambda w, t: (SMALL + ["--config.init_from="
                                                       + _file_with(t, "pytorch_model.bin", "not loaded")], None),
     "pickle-based weight file"),
    ("workdir of another run", lambda w, t: (SMALL + ["--config.optim.weight_decay=0.5"], _other_run_workdir(w, t)),
     "holds a different run (optim.weight_decay"),
    ("workdir is a file", lambda w, t: (SMALL, _file_with(t, "afile", "x")), "is not a directory"),
    ("eval sample prompt that tokenizes to nothing", lambda w, t: (SMALL + [
        "--config.model.vocab_size=320", f"--config.data.tokenizer={w['tok']}", "--config.eval.every_steps=2",
        "--config.eval.sample_prompts=('data', '')"], None), "eval.sample_prompts 2 (''): tokenizes to no tokens"),
    ("eval sample longer than the model", lambda w, t: (SMALL + [
        "--config.model.vocab_size=320", f"--config.data.tokenizer={w['tok']}", "--config.eval.every_steps=2",
        "--config.eval.sample_prompts=('data',)", "--config.eval.sample_max_new_tokens=300"], None),
     "eval.sample_max_new_tokens: 300 after the"),
    ("model option out of range", lambda w, t: (SMALL + ["--config.model.partial_rotary_factor=0.01"], None),
     "model.partial_rotary_factor: 0.01 of head_dim 16 rotates 0 dimensions"),
    ("unknown qk_norm", lambda w, t: (SMALL + ["--config.model.qk_norm=layer"], None), "model.qk_norm: 'layer'"),
    ("mixture: manifest missing", lambda w, t: ([_mixture_file(w, t, qa=_copy_source(w, t, None))], None),
     "manifest.json"),
    ("mixture: manifest seq_len edited by hand", lambda w, t: (
        [_mixture_file(w, t, qa=_copy_source(w, t, lambda m: m.update(seq_len=64)))], None), "seq_len"),
    ("mixture: manifest vocab above the model", lambda w, t: (
        [_mixture_file(w, t, qa=_copy_source(w, t, lambda m: m.update(vocab_size=1000)))], None), "vocab"),
    ("mixture: tokenizer fingerprint differs", lambda w, t: (
        [_mixture_file(w, t, qa=_copy_source(w, t, lambda m: m.update(tokenizer_fingerprint="0" * 64)))], None),
     "fingerprint"),
    ("mixture: tokenizer missing", lambda w, t: ([_mixture_file(w, t, tokenizer="/no/tok.model")], None),
     "/no/tok.model"),
    ("mixture: phase names an unknown source", lambda w, t: ([_mixture_file(
        w, t, phases="(dict(weights=dict(general=1.0, code=1.0)),)")], None), "code"),
    ("mixture: negative weight", lambda w, t: ([_mixture_file(
        w, t, phases="(dict(weights=dict(general=1.0, qa=-0.5)),)")], None), "-0.5"),
    ("mixture: all weights zero", lambda w, t: ([_mixture_file(
        w, t, phases="(dict(weights=dict(general=0.0, qa=0.0)),)")], None), "data.phases[0]"),
    ("mixture: phases out of order", lambda w, t: ([_mixture_file(
        w, t, phases="(dict(weights=dict(general=1.0)), dict(weights=dict(qa=1.0), start_at=dict(step=10)), "
                     "dict(weights=dict(general=1.0), start_at=dict(step=5)))")], None), "data.phases[2]"),
    ("mixture: lr threshold never reached", lambda w, t: ([_mixture_file(
        w, t, phases="(dict(weights=dict(general=1.0)), dict(weights=dict(qa=1.0), start_at=dict(lr=1e-9)))")],
        None), "1e-05"),
    ("mixture: no phases", lambda w, t: ([_mixture_file(w, t, phases="()")], None), "data.phases"),
    ("mixture: truncated shard", lambda w, t: ([_mixture_file(w, t, qa=_truncated_shard(w, t))], None),
     "train-00000-of-00001.array_record: not a readable ArrayRecord file, truncated or damaged"),
    ("mixture: sources with and without BOS", lambda w, t: (
        [_mixture_file(w, t, qa=_copy_source(w, t, lambda m: m.update(bos="never", add_bos=False)))], None),
     "add_bos true (documents start with BOS), but"),
    ("negative data workers", lambda w, t: (SMALL + ["--config.data.workers=-1"], None),
     "data.workers: -1, expected at least 0 workers"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, tmp_path, capsys, case):
    _, build, expected = case
    argv, workdir = build(world, tmp_path)
    if workdir is None:
        workdir = str(tmp_path / "never")
    if workdir != "none":
        argv = [*argv, f"--workdir={workdir}"]
    watched = [p for p in (workdir, world["pretrained"], world["general"], world["qa"]) if p != "none"]
    before = _snapshot(*watched)
    capsys.readouterr()
    status = train.main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    assert expected in err[0], err[0]
    assert _snapshot(*watched) == before, "a failed run changed files on disk"


NOT_JSON = '{"text": "ok"}\nnot json\n'
NO_FIELD = '{"body": "x"}\n'


def _parquet(tmp_path, **columns):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "docs.parquet")
    pq.write_table(pa.table(columns), path)
    return path


def _no_bos_tokenizer(tmp_path):
    return ["--tokenizer=" + data_helpers.make_hf_tokenizer(tmp_path / "qwen2_like", vocab_size=300)]


def _mount_tmpfs(path, options):
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True).returncode == 0


@pytest.mark.parametrize("kind", ["read-only", "full"])
def test_workdir_that_cannot_hold_the_run(tmp_path, capsys, monkeypatch, kind):
    mnt = str(tmp_path / "mnt")
    options = "ro,size=1m" if kind == "read-only" else "size=64k"
    mounted = _mount_tmpfs(mnt, options)
    if not mounted:  # not allowed to mount here: make the same conditions without a filesystem
        os.makedirs(mnt, exist_ok=True)
        if kind == "read-only":
            os.chmod(mnt, 0o555)
        else:
            monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(64 << 10, 0, 64 << 10))
    try:
        before = _snapshot(mnt)
        status = train.main(["train", *SMALL, f"--workdir={mnt}/run"])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1, err
        expected = "cannot write in" if kind == "read-only" else "MiB free, a checkpoint of this model needs about"
        assert expected in err[0] and "Traceback" not in err[0]
        assert _snapshot(mnt) == before
    finally:
        if mounted:
            subprocess.run(["umount", mnt], check=True)


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda t: ["--input=jsonl:" + _file_with(t, "bad.jsonl", NOT_JSON)], "bad.jsonl:2"),
        (lambda t: ["--input=jsonl:" + _file_with(t, "nofield.jsonl", NO_FIELD)], "nofield.jsonl:1"),
        (lambda t: ["--input=jsonl:/no/such/*.jsonl"], "/no/such/*.jsonl"),
        (lambda t: ["--input=parquet:" + _parquet(t, body=["a", "b"])], "docs.parquet: no column 'text'"),
        (lambda t: ["--input=parquet:" + _parquet(t, text=[1, 2])], "docs.parquet: column 'text' is int64, expected a "
                                                                     "string column"),
        (lambda t: ["--input=jsonl:" + _file_with(t, "ok.jsonl", '{"text": "ok"}\n'), "--bos=always",
                    *_no_bos_tokenizer(t)], "--bos always: tokenizer"),
    ],
    ids=["jsonl line not json", "jsonl line without the field", "input glob matching nothing",
         "parquet without the column", "parquet column not text", "bos always without a bos token"],
)
def test_bad_prepare_input(world, tmp_path, capsys, setup, expected):
    out = str(tmp_path / "out")
    status = prepare.main([f"--tokenizer={world['tok']}", *setup(tmp_path), "--seq_len=32", f"--out={out}",
                           "--val_examples=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: ") and expected in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not os.path.exists(out)


def test_a_library_error_becomes_one_line_whatever_its_message():
    """What every one-line error quotes of a library's exception: its first line, capped; its type
    when it says nothing (an empty message must not turn into an IndexError of our own)."""
    from cpt_jax.config import first_line

    assert first_line(ValueError("bad header\n  at byte 12\n")) == "bad header"
    assert first_line(OSError("")) == "OSError"
    assert first_line(RuntimeError("\n  \n")) == "RuntimeError"
    assert first_line(KeyError("tokens")) == "'tokens'"
    assert first_line(ValueError("x" * 1000)) == "x" * 300
