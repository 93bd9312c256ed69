"""Tests of the loader: the batch contract, data order as a pure function of (config, seed, step)
on any topology, thread count and resume, process slicing, the iterator state, and bad inputs."""

from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from data_helpers import (
    make_documents,
    make_hf_tokenizer,
    make_prepared_source,
    reference_segments,
    write_synthetic_source,
)
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpt_jax import config, schedules
from cpt_jax.config import ConfigError, default_config
from cpt_jax.data import pipeline as pl
from cpt_jax.data import sources
from cpt_jax.data.synthetic import SyntheticWalks
from cpt_jax.data.tokenization import load_tokenizer

B, L, STEPS, VOCAB = 8, 16, 24, 1000


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tokenizer, three synthetic-token sources of different sizes and one real prepared source."""
    root = tmp_path_factory.mktemp("pipeline")
    tok_path = make_hf_tokenizer(root / "tok", vocab_size=300)
    tok = load_tokenizer(tok_path)
    common = dict(vocab_size=VOCAB, eos_id=tok.eos_id, fingerprint=tok.fingerprint)
    dirs = {
        "web": write_synthetic_source(root, "web", 60, L, examples_per_shard=7, **common),
        "code": write_synthetic_source(root, "code", 23, L, examples_per_shard=5, **common),
        "qa": write_synthetic_source(root, "qa", 11, L, **common),
        "real": make_prepared_source(root, tok_path, make_documents(120, seed=5), seq_len=L, name="real"),
    }
    return {"tokenizer": tok_path, "eos_id": tok.eos_id, "dirs": dirs, "root": root}


def mixture_config(data, **overrides):
    cfg = default_config()
    cfg.train.steps = STEPS
    cfg.train.batch_size = B
    cfg.train.seq_len = L
    cfg.model.vocab_size = VOCAB
    cfg.schedule.start_lr = 1e-3
    cfg.seed = 3
    cfg.data.kind = "mixture"
    cfg.data.tokenizer = data["tokenizer"]
    cfg.data.sources = dict(data["dirs"])
    cfg.data.phases = (
        {"weights": {"web": 3, "code": 1, "real": 1}},
        {"weights": {"web": 1, "qa": 1, "real": 1}, "start_at": {"lr_ratio": 0.5}},
    )
    for key, value in overrides.items():
        node = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return cfg


def make(cfg, sharding=None):
    schedule = schedules.build(cfg.schedule, cfg.train.steps, cfg.schedule.start_lr)
    return pl.Pipeline(cfg, schedule, sharding)


def batch_sharding(devices, shape=(2, 4), axes=("data", "fsdp")):
    mesh = Mesh(np.asarray(devices).reshape(shape), axes)
    return NamedSharding(mesh, PartitionSpec(axes))


def as_numpy(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def examples_for_step(pipe, step):
    """(source id, record index) of each of the step's B global examples, in batch order, from the
    mixture and each source's epoch order (generated data: the example's global index)."""
    start = int(step) * pipe.batch_size
    source, k = np.array([pipe.mixture.select_one(i) for i in range(start, start + pipe.batch_size)]).T
    if pipe.sources:
        k = np.array([sources.record_index(pipe.cfg.seed, pipe.sources[s].name, pipe.sources[s].num_examples, n)
                      for s, n in zip(source.tolist(), k.tolist(), strict=True)])
    return source, k


@pytest.fixture(scope="module")
def pipe(data):
    return make(mixture_config(data))


# ----------------------------------------------------------------------------- the batch contract


def test_batch_contract(pipe, data):
    assert pl.BATCH_KEYS == ("inputs", "targets", "segment_ids", "positions", "loss_mask")
    for step in (0, 5, STEPS - 1):
        batch = pipe.host_batch(step)
        assert set(batch) == set(pl.BATCH_KEYS)
        for key, value in batch.items():
            assert value.shape == (B, L), key
            assert value.dtype == np.dtype(pl.BATCH_DTYPES[key]), key
        np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
        assert batch["segment_ids"].min() >= 1
        assert np.all(batch["loss_mask"] == 1.0)
        seg, pos = reference_segments(batch["inputs"], data["eos_id"])
        np.testing.assert_array_equal(batch["segment_ids"], seg)
        np.testing.assert_array_equal(batch["positions"], pos)
        # The tokens are exactly the records examples_for_step names, read independently
        # through the source's grain dataset.
        source_ids, records = examples_for_step(pipe, step)
        for row in range(B):
            expected = pipe.sources[source_ids[row]].dataset[int(records[row])].astype(np.int32)
            np.testing.assert_array_equal(batch["inputs"][row], expected[:-1])
            np.testing.assert_array_equal(batch["targets"][row], expected[1:])


def test_real_documents_get_several_segments(pipe, data):
    # Rows of the prepared source hold several EOS-separated documents: segments restart there.
    real = pipe.mixture.source_names.index("real")
    found = False
    for step in range(STEPS):
        source_ids, _ = examples_for_step(pipe, step)
        batch = pipe.host_batch(step)
        for row in np.flatnonzero(source_ids == real):
            inputs, seg, pos = batch["inputs"][row], batch["segment_ids"][row], batch["positions"][row]
            eos = np.flatnonzero(inputs[:-1] == data["eos_id"])
            assert seg[-1] == 1 + len(eos)
            for e in eos:
                assert pos[e + 1] == 0 and seg[e + 1] == seg[e] + 1
            found = found or len(eos) > 0
    assert found


def test_synthetic_batches():
    cfg = default_config()
    cfg.train.batch_size, cfg.train.seq_len, cfg.train.steps = B, L, STEPS
    cfg.schedule.start_lr = 1e-3
    p = make(cfg)
    assert p.mixture.source_names == ["synthetic"] and len(p.mixture.phases) == 1 and p.tokenizer_fingerprint is None
    batch = p.host_batch(3)
    m, d = cfg.model, cfg.data
    tokens = SyntheticWalks(cfg.seed, L, m.vocab_size, d.synthetic_branching)(np.arange(3 * B, 4 * B))
    np.testing.assert_array_equal(batch["inputs"], tokens[:, :-1])
    np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
    assert np.all(batch["segment_ids"] == 1)
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(L), (B, 1)))
    for key, value in batch.items():
        assert value.dtype == np.dtype(pl.BATCH_DTYPES[key]) and value.shape == (B, L)
    source_ids, records = examples_for_step(p, 3)
    assert np.all(source_ids == 0) and records.tolist() == list(range(3 * B, 4 * B))
    assert p.mixture.tokens_per_source(5, L) == {"synthetic": 5 * B * L}
    assert p.mixture.phase_at(STEPS - 1) == 0


# ----------------------------------------------------------------------------- order


def test_order_follows_phases_and_carries_positions(pipe):
    names = pipe.mixture.source_names
    assert names == ["code", "qa", "real", "web"]  # ConfigDict order: sorted names
    switch = pipe.mixture.phases[1].start_step
    assert 0 < switch < STEPS
    assert pipe.mixture.phase_at(switch - 1) == 0 and pipe.mixture.phase_at(switch) == 1
    before = np.concatenate([examples_for_step(pipe, s)[0] for s in range(switch)])
    after = np.concatenate([examples_for_step(pipe, s)[0] for s in range(switch, STEPS)])
    assert names.index("qa") not in before and names.index("code") not in after
    web = names.index("web")
    assert abs(np.mean(before == web) - 0.6) < 0.05 and abs(np.mean(after == web) - 1 / 3) < 0.05
    # Every source's draws run through whole epochs: each epoch of `qa` (11 records) is a
    # permutation, and web continues its epoch across the switch instead of restarting it.
    ids = np.concatenate([examples_for_step(pipe, s)[0] for s in range(STEPS)])
    recs = np.concatenate([examples_for_step(pipe, s)[1] for s in range(STEPS)])
    for name, n in (("qa", 11), ("web", 60), ("code", 23)):
        drawn = recs[ids == names.index(name)]
        for e in range(len(drawn) // n):
            assert sorted(drawn[e * n : (e + 1) * n].tolist()) == list(range(n))
    web_k = np.array([pipe.mixture.select_one(i) for i in range(switch * B, switch * B + B)]).T
    first_web = int(web_k[1][web_k[0] == web][0])
    assert first_web == np.sum(before == web)
    # Tokens per source: closed form, summing to what was trained.
    tps = pipe.mixture.tokens_per_source(STEPS, L)
    assert sum(tps.values()) == STEPS * B * L
    assert tps["web"] == np.sum(ids == web) * L


def test_same_batches_on_8_devices_4_devices_any_threads_and_after_resume(data):
    cfg = mixture_config(data)
    host = make(cfg)
    expected = [host.host_batch(s) for s in range(STEPS)]

    p8 = make(cfg, batch_sharding(jax.devices()))
    assert p8.rows == slice(0, B)
    seen = []
    with p8.iterate(0, STEPS) as batches:
        for step, batch in batches:
            seen.append(step)
            assert batch["inputs"].sharding == p8.batch_sharding
            assert len(batch["inputs"].addressable_shards) == 8
            for key, value in as_numpy(batch).items():
                np.testing.assert_array_equal(value, expected[step][key], err_msg=f"8 devices, step {step}, {key}")
        assert batches.get_state()["step"] == STEPS
    assert seen == list(range(STEPS))

    # 4 devices, one reading thread; and 4 threads (grain's iterator, whatever reads ahead).
    for threads in (1, 4):
        cfg4 = mixture_config(data, **{"data.num_threads": threads, "data.prefetch": 1})
        p4 = make(cfg4, batch_sharding(jax.devices()[:4], shape=(4,), axes=("data",)))
        with p4.iterate(0, STEPS) as batches:
            for step, batch in batches:
                assert len(batch["inputs"].addressable_shards) == 4
                for key, value in as_numpy(batch).items():
                    np.testing.assert_array_equal(value, expected[step][key], err_msg=f"{threads}, {step} {key}")

    # Resume at step k: nothing but k is needed; the iterator's state counts the steps it handed out.
    k = 13
    resumed = make(cfg, batch_sharding(jax.devices()))
    with resumed.iterate(k, STEPS) as batches:
        assert batches.get_state()["step"] == k
        steps = []
        for step, batch in batches:
            steps.append(step)
            for key, value in as_numpy(batch).items():
                np.testing.assert_array_equal(value, expected[step][key], err_msg=f"resume, step {step}, {key}")
            assert batches.get_state()["step"] == step + 1
            assert batches.get_state()["grain"] == {"next_index": step + 1 - k}  # grain counts alike
    assert steps == list(range(k, STEPS))
    # global_batch without the iterator agrees too.
    for key, value in as_numpy(resumed.global_batch(7)).items():
        np.testing.assert_array_equal(value, expected[7][key])
    assert list(resumed.iterate(5, 5)) == []


def test_resume_check_names_both_steps(pipe):
    pipe.check_resumed(8, "ckpt/8/data/process_0-of-1.json", {"step": 8})
    pipe.check_resumed(8, "ckpt/8/data/process_0-of-1.json", None)  # saved on another topology: the step rules
    with pytest.raises(ConfigError, match=r"^ckpt/8/data/process_0-of-1\.json: the data iterator's state is at "
                       r"step 7, expected step 8 \(the checkpoint's step\)"):
        pipe.check_resumed(8, "ckpt/8/data/process_0-of-1.json", {"step": 7})


def test_seed_changes_order(data):
    a = make(mixture_config(data))
    b = make(mixture_config(data, seed=4))
    assert not np.array_equal(examples_for_step(a, 0)[1], examples_for_step(b, 0)[1])
    # The mixture's interleave does not depend on the seed, only the records drawn.
    np.testing.assert_array_equal(examples_for_step(a, 0)[0], examples_for_step(b, 0)[0])


# ----------------------------------------------------------------------------- process slicing


class ProcessView:
    """A real sharding seen from one imaginary process that owns `devices`: what process_rows
    reads of a sharding (its devices and the indices of the addressable ones)."""

    def __init__(self, inner, devices):
        self.inner = inner
        self.mine = set(devices)

    @property
    def device_set(self):
        return self.inner.device_set

    def addressable_devices_indices_map(self, shape):
        return {d: i for d, i in self.inner.devices_indices_map(shape).items() if d in self.mine}


def test_process_rows_for_a_data2_fsdp4_mesh():
    devices = np.asarray(jax.devices()).reshape(2, 4)
    sharding = NamedSharding(Mesh(devices, ("data", "fsdp")), PartitionSpec(("data", "fsdp")))
    assert pl.process_rows(sharding, 16) == slice(0, 16)  # this one process holds every row
    # Two hosts of 4 devices, one per data row: each holds a contiguous half.
    assert pl.process_rows(ProcessView(sharding, devices[0]), 16) == slice(0, 8)
    assert pl.process_rows(ProcessView(sharding, devices[1]), 16) == slice(8, 16)
    # Four hosts of 2 devices each.
    assert pl.process_rows(ProcessView(sharding, devices[1, 2:]), 16) == slice(12, 16)
    # A host whose devices hold rows 0-1 and 8-9 cannot be fed from one local block.
    with pytest.raises(ConfigError, match=r"^mesh: this process .* holds rows \[\(0, 2\), \(8, 10\)\].*one contiguous"):
        pl.process_rows(ProcessView(sharding, [devices[0, 0], devices[1, 0]]), 16)


def test_process_rows_with_replicated_axes():
    devices = np.asarray(jax.devices()).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    # The tensor axis replicates rows: a host owning devices[0] (both tensor halves) holds [0, 4).
    assert pl.process_rows(ProcessView(sharding, devices[0].ravel()), 8) == slice(0, 4)
    assert pl.process_rows(ProcessView(sharding, devices[1, 1]), 8) == slice(6, 8)
    # A batch replicated everywhere: every process holds it all.
    replicated = NamedSharding(mesh, PartitionSpec())
    assert pl.process_rows(ProcessView(replicated, devices[1, 0]), 8) == slice(0, 8)


# ----------------------------------------------------------------------------- bad inputs


def test_batch_must_split_over_the_batch_devices(data):
    cfg = mixture_config(data, **{"train.batch_size": 12})
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 12, expected a multiple of the 8 devices the batch"):
        make(cfg, batch_sharding(jax.devices()))
    # 12 rows do split over 4 devices.
    p = make(cfg, batch_sharding(jax.devices()[:4], shape=(4,), axes=("data",)))
    assert p.host_batch(0)["inputs"].shape == (12, L)


def test_batch_must_split_over_the_processes(data, monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    with pytest.raises(ConfigError, match=r"^train\.batch_size: 8, expected a multiple of the 3 processes"):
        make(mixture_config(data))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"data.tokenizer": ""}, r"^data\.tokenizer: empty"),
        ({"data.sources": {}}, r"^data\.sources: empty"),
        ({"data.kind": "files"}, r"^data\.kind: 'files', expected one of"),
        ({"data.phases": ()}, r"^data\.phases: empty"),
        ({"train.seq_len": 32}, r"manifest\.json: seq_len 16, expected 32"),
        ({"model.vocab_size": 500}, r"manifest\.json: vocab_size 1000, expected at most the model's vocab_size 500"),
        (
            {"data.phases": ({"weights": {"web": 1, "news": 1}},)},
            r"^data\.phases\[0\]\.weights\.news: unknown source; known sources are: code, qa, real, web",
        ),
    ],
)
def test_bad_inputs_are_one_line_config_errors(data, overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        make(mixture_config(data, **overrides))
    assert "\n" not in str(info.value)


def test_a_source_made_with_another_tokenizer_is_refused(data, tmp_path):
    other = write_synthetic_source(tmp_path, "other", 10, L, vocab_size=VOCAB, fingerprint="f" * 64)
    cfg = mixture_config(data)
    cfg.data.sources = {"web": data["dirs"]["web"], "other": other}
    cfg.data.phases = ({"weights": {"web": 1, "other": 1}},)
    with pytest.raises(ConfigError, match=r"manifest\.json: tokenizer_fingerprint ffff"):
        make(cfg)


@pytest.mark.parametrize("key, value, message", [
    ("prefetch", 0, r"^data\.prefetch: 0, expected at least 1 batch$"),
    ("num_threads", 0, r"^data\.num_threads: 0, expected at least 1 thread$"),
    ("workers", -1, r"^data\.workers: -1, expected at least 0 workers \(0: read in this process\)$"),
])
def test_bad_loader_settings(key, value, message):
    cfg = default_config()
    cfg.data[key] = value
    with pytest.raises(ConfigError, match=message):
        config.validate(cfg)


def _damaged_copy(data, tmp_path, damage):
    """mixture_config with 'web' replaced by a copy whose third shard `damage(path, size)` edits."""
    web = str(tmp_path / "web")
    shutil.copytree(data["dirs"]["web"], web)
    shard = os.path.join(web, json.load(open(os.path.join(web, "manifest.json")))["shards"][2])
    damage(shard, os.path.getsize(shard))
    return mixture_config(data, **{"data.sources": dict(data["dirs"], web=web)}), shard


def test_a_truncated_shard_is_refused_at_startup(data, tmp_path):
    cfg, shard = _damaged_copy(data, tmp_path, lambda path, size: os.truncate(path, size // 2))
    with pytest.raises(ConfigError, match=rf"^{shard}: not a readable ArrayRecord file, truncated or damaged"):
        make(cfg)


def test_a_corrupt_record_is_named_at_the_first_read(data, tmp_path):
    def corrupt(path, size):
        with open(path, "r+b") as f:  # the index at the end stays intact: only reading finds it
            f.seek(100)
            f.write(b"\xff" * 64)

    cfg, shard = _damaged_copy(data, tmp_path, corrupt)
    p = make(cfg)
    damaged = rf"^{shard}: record \d+ unreadable \(.*\); the file is damaged"
    with pytest.raises(sources.DataError, match=damaged), p.iterate(0, STEPS) as batches:
        for _ in batches:
            pass


def test_sources_prepared_with_and_without_bos_are_refused(data, tmp_path):
    qa = str(tmp_path / "qa")
    shutil.copytree(data["dirs"]["qa"], qa)
    manifest = json.load(open(os.path.join(qa, "manifest.json")))
    json.dump(dict(manifest, bos="always", add_bos=True), open(os.path.join(qa, "manifest.json"), "w"))
    with pytest.raises(ConfigError, match=r"qa/manifest\.json: add_bos true \(documents start with BOS\), but "
                       r".*manifest\.json has add_bos false; expected one convention"):
        make(mixture_config(data, **{"data.sources": dict(data["dirs"], qa=qa)}))
