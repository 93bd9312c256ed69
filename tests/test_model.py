"""The decoder: causality, per-document masking, parameter sharding, scan/remat/chunk equivalence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import config, losses, model, sharding

TINY = model.ModelConfig(
    n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=97, max_seq_len=64, dtype="float32"
)


@pytest.fixture(scope="module")
def params():
    return model.init_params(TINY, seed=0)


def _logits(params, tokens, c=TINY, **kw):
    return np.asarray(jax.jit(lambda p, t: model.apply(p, t, c, **kw))(params, tokens))


def test_causal_later_tokens_do_not_change_earlier_logits(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY.vocab_size)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % TINY.vocab_size)
    a, b = _logits(params, tokens), _logits(params, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3


def test_documents_do_not_attend_to_each_other(params):
    doc1 = jax.random.randint(jax.random.key(2), (1, 6), 0, TINY.vocab_size)
    doc2 = jax.random.randint(jax.random.key(3), (1, 10), 0, TINY.vocab_size)
    packed = jnp.concatenate([doc1, doc2], axis=1)
    seg = jnp.asarray([[1] * 6 + [2] * 10])
    pos = jnp.asarray([list(range(6)) + list(range(10))])
    f = jax.jit(lambda p, t, s, q: model.apply(p, t, TINY, s, q))
    packed_logits = np.asarray(f(params, packed, seg, pos))
    alone = _logits(params, doc2)
    np.testing.assert_allclose(packed_logits[:, 6:], alone, atol=1e-5)


def test_nnx_module_call_matches_functional_apply(params):
    m = model.Decoder(TINY, rngs=__import__("flax").nnx.Rngs(params=0))
    tokens = jnp.arange(12).reshape(1, 12) % TINY.vocab_size
    np.testing.assert_allclose(np.asarray(m(tokens)), _logits(params, tokens), atol=1e-6)


@pytest.mark.parametrize(
    "variant",
    [
        dict(mlp="squared_relu", norm="layernorm"),
        dict(qkv_bias=True, tie_embeddings=True),
        dict(rope_scaling="llama3", rope_factor=8.0, rope_original_max_seq_len=16),
        dict(qk_norm="head"),
        dict(qk_norm="projection", norm_position="post"),
        dict(mlp="squared_relu", norm="layernorm1p", partial_rotary_factor=0.5),
    ],
)
def test_variants_run_and_count_parameters(variant):
    c = dataclasses.replace(TINY, **variant)
    p = model.init_params(c, 0)
    assert sum(x.size for x in jax.tree.leaves(p)) == c.num_params()
    out = _logits(p, jnp.zeros((1, 8), jnp.int32), c)
    assert out.shape == (1, 8, c.vocab_size) and np.isfinite(out).all()


def test_new_parameters_carry_logical_axes():
    c = dataclasses.replace(TINY, qk_norm="projection", norm_position="post", norm="layernorm1p")
    names = model.logical_axes(c)["layers"]
    assert names["q_norm_scale"] == ("layers", "heads", "head_dim")
    assert names["k_norm_scale"] == ("layers", "kv_heads", "head_dim")
    assert names["attn_norm_bias"] == ("layers", "norm")
    assert model.logical_axes(dataclasses.replace(TINY, qk_norm="head"))["layers"]["q_norm_scale"] == (
        "layers", "head_dim")
    # layernorm1p stores w of its 1 + w scale: the init is the identity scale.
    p = model.init_params(c, 0)
    assert float(np.abs(np.asarray(p["layers"]["attn_norm_scale"])).max()) == 0.0


def test_partial_rotary_leaves_the_rest_of_each_head_alone():
    c = dataclasses.replace(TINY, partial_rotary_factor=0.5)  # head_dim 8: dims 0-3 rotate, 4-7 pass
    x = jax.random.normal(jax.random.key(7), (1, 5, 2, 8))
    positions = jnp.arange(5)[None]
    cos, sin = model.rope_tables(positions, c)
    y = np.asarray(model._rope(x, cos, sin))
    np.testing.assert_array_equal(y[..., 4:], np.asarray(x)[..., 4:])
    assert np.abs(y[:, 1:, :, :4] - np.asarray(x)[:, 1:, :, :4]).max() > 1e-3
    np.testing.assert_allclose(np.linalg.norm(y[..., :4], axis=-1), np.linalg.norm(np.asarray(x)[..., :4], axis=-1),
                               rtol=1e-5)


def test_scan_unrolled_and_remat_agree(params):
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, TINY.vocab_size)
    targets = jnp.roll(tokens, -1, axis=1)

    def loss_and_grad(c):
        def f(p):
            h = model.forward(p, tokens, c)
            return losses.cross_entropy_sum(h, model.head_weights(p, c), targets, jnp.ones_like(tokens), c.dtype)

        return jax.jit(jax.value_and_grad(f))(params)

    ref_loss, ref_grad = loss_and_grad(TINY)
    for variant in (dict(scan_layers=False), dict(remat="full"), dict(remat="save_dots", scan_layers=False)):
        loss, grad = loss_and_grad(dataclasses.replace(TINY, **variant))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_cross_entropy_matches_plain(params):
    h = jax.random.normal(jax.random.key(5), (2, 32, TINY.d_model))
    t = jax.random.randint(jax.random.key(6), (2, 32), 0, TINY.vocab_size)
    mask = (jnp.arange(32) % 3 != 0)[None].repeat(2, 0)
    w = model.head_weights(params, TINY)
    f = lambda w, chunk: losses.cross_entropy_sum(h, w, t, mask, "float32", chunk)
    plain, g_plain = jax.value_and_grad(f)(w, 0)
    chunked, g_chunked = jax.value_and_grad(f)(w, 8)
    np.testing.assert_allclose(chunked, plain, rtol=1e-6)
    np.testing.assert_allclose(g_chunked, g_plain, rtol=1e-5, atol=1e-7)


def test_parameters_are_sharded_as_the_rules_say():
    cfg = config.default_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.rules_from_config(cfg.mesh)
    c = dataclasses.replace(TINY, vocab_size=96)
    names = model.logical_axes(c)
    shardings = sharding.param_shardings(model.abstract_params(c), names, mesh, rules)
    params = jax.jit(lambda: model.init_params(c, 0), out_shardings=shardings)()
    wq = params["layers"]["wq"]  # [layers, embed -> fsdp, heads -> tensor, head_dim]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    name_leaves = jax.tree.leaves(names, is_leaf=lambda x: isinstance(x, tuple))
    for leaf, axis_names in zip(jax.tree.leaves(params), name_leaves, strict=True):
        split = 1
        for n in axis_names:
            axes = rules.get(n)
            for a in (axes,) if isinstance(axes, str) else axes or ():
                split *= mesh.shape[a]
        per_device = leaf.addressable_shards[0].data.nbytes
        assert per_device == leaf.nbytes // split, (axis_names, leaf.shape)


def test_indivisible_parameter_is_a_config_error():
    cfg = config.default_config()
    cfg.mesh.fsdp, cfg.mesh.tensor = 1, 8
    mesh = sharding.make_mesh(cfg.mesh)
    c = dataclasses.replace(TINY, vocab_size=96)  # n_kv_heads=2 cannot split 8 ways
    with pytest.raises(config.ConfigError, match=r"parameter layers\.wk: dimension 'kv_heads' of size 2"):
        sharding.param_shardings(model.abstract_params(c), model.logical_axes(c), mesh, sharding.DEFAULT_RULES)


# ----------------------------------------------------------------------------- attention implementation

GPU_SHAPE = dataclasses.replace(TINY, dtype="bfloat16", n_heads=4, d_model=256)  # head width 64: cuDNN takes it


@pytest.mark.parametrize("platform", ["gpu", "cpu", "tpu"])
@pytest.mark.parametrize("c", [GPU_SHAPE, dataclasses.replace(GPU_SHAPE, d_model=1024),  # head width 256
                               dataclasses.replace(GPU_SHAPE, dtype="float32")], ids=["supported", "wide", "fp32"])
def test_auto_attention_is_xla_on_every_platform_until_cudnn_has_run(c, platform, monkeypatch):
    """'auto' never picks the cuDNN path, which has not yet run on a GPU (README: not verified)."""
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    assert model.attention_implementation(c) == "xla"
    assert model.attention_implementation(dataclasses.replace(c, attention="xla")) == "xla"


def test_cudnn_attention_where_it_applies_and_refused_elsewhere(monkeypatch):
    cudnn = dataclasses.replace(GPU_SHAPE, attention="cudnn")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert model.attention_implementation(cudnn) == "cudnn"
    assert model.attention_implementation(dataclasses.replace(cudnn, dtype="float16")) == "cudnn"
    for platform in ("cpu", "tpu"):
        with pytest.raises(config.ConfigError, match=f"'cudnn' on {platform} devices, expected 'auto' or 'xla'"):
            model.attention_implementation(cudnn, platform)
    with pytest.raises(config.ConfigError, match="the head width is 256, cuDNN's fused attention takes multiples "
                                                 "of 8 up to 128"):
        model.attention_implementation(dataclasses.replace(cudnn, d_model=1024))
    with pytest.raises(config.ConfigError, match="model.dtype is 'float32', cuDNN's fused attention takes bfloat16"):
        model.attention_implementation(dataclasses.replace(cudnn, dtype="float32"))


@pytest.mark.parametrize("attention, expected", [("auto", "xla"), ("cudnn", "cudnn")])
def test_the_forward_pass_asks_jax_for_the_chosen_implementation(attention, expected, monkeypatch):
    """With the backend patched to a GPU, the traced model passes what the selection chose to
    jax.nn.dot_product_attention (the call itself runs XLA's here: there is no GPU)."""
    asked = []
    real = jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        asked.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    c = dataclasses.replace(GPU_SHAPE, attention=attention)
    jax.eval_shape(lambda p, t: model.apply(p, t, c), model.abstract_params(c), jnp.zeros((1, 8), jnp.int32))
    assert asked and set(asked) == {expected}
