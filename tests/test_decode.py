"""Decoding with a KV cache: the cached decode computes what a full forward pass computes at every
position (every model variant), greedy generation on a sharded mesh is the argmax of the full
forward, sampling, and prompt checks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax import config, decode, model, sharding
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import load_tokenizer

BASE = model.ModelConfig(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=96, max_seq_len=64,
                         dtype="float32")
VARIANTS = {  # every model option, in three models
    "qwen3_qkv_bias_tied_llama3_rope": dict(qk_norm="head", qkv_bias=True, tie_embeddings=True, rope_scaling="llama3",
                                            rope_factor=8.0, rope_original_max_seq_len=16),
    "olmo2": dict(qk_norm="projection", norm_position="post"),
    "nemotron": dict(mlp="squared_relu", norm="layernorm1p", partial_rotary_factor=0.5, head_dim=12),
}


def _params(c, seed=0):
    """Random parameters far from the init (unit norms, zero biases), so every one shows in the logits."""
    p = model.init_params(c, seed)
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.15 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys,
                                                                                             strict=True)])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_kv_cache_decode_equals_a_full_forward_at_every_position(variant):
    c = dataclasses.replace(BASE, **VARIANTS[variant])
    params = _params(c)
    T, lengths = 12, np.array([1, 4, 7])
    tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, T), 0, c.vocab_size))
    full = np.asarray(jax.jit(lambda p, t: model.apply(p, t, c))(params, tokens))
    prefill = jax.jit(decode.prefill, static_argnums=(4,))
    step = jax.jit(decode.decode_step, static_argnums=(4,))
    # Ragged prompts, right-padded with junk: the padding must never be attended.
    prompts = np.where(np.arange(lengths.max())[None] < lengths[:, None], tokens[:, : lengths.max()], 7)
    logits, cache = prefill(params, decode.init_cache(c, 3, T), prompts, lengths, c)
    rows = np.arange(3)
    errors = [np.abs(np.asarray(logits) - full[rows, lengths - 1]).max()]
    for t in range(T - lengths.max()):  # teacher-forced: feed the true next token at each row's position
        positions = lengths + t
        logits, cache = step(params, cache, tokens[rows, positions], positions, c)
        errors.append(np.abs(np.asarray(logits) - full[rows, positions]).max())
    # Rows 0 and 1 have now been checked at every position from their prompt's end to T - 5 and T - 2.
    assert np.abs(full).max() > 1.0
    assert max(errors) < 2e-5, errors


def _greedy_reference(params, c, prompt, n, eos_id, width=16):
    """Greedy decoding by full forward passes (one shape: causal, so the padding after is ignored)."""
    forward = jax.jit(lambda p, t: model.apply(p, t, c))
    ids, out = list(prompt), []
    for _ in range(n):
        row = np.zeros((1, width), np.int32)
        row[0, : len(ids)] = ids
        nxt = int(np.argmax(np.asarray(forward(params, row))[0, len(ids) - 1]))
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos_id:
            break
    return out


def test_greedy_generation_on_a_sharded_mesh_is_the_argmax_of_the_full_forward():
    c = dataclasses.replace(BASE, qk_norm="head")
    cfg = config.default_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
    shardings = sharding.param_shardings(model.abstract_params(c), model.logical_axes(c), mesh, rules)
    params = _params(c)
    sharded = jax.device_put(params, shardings)
    prompts = [[5, 9, 2], [11], [3, 3, 8, 40, 1]]
    eos = _greedy_reference(params, c, prompts[1], 1, None)[0]  # prompt 2 ends at once with this "EOS"
    got = decode.Generator(c, mesh=mesh, rules=rules).generate(sharded, prompts, 6, eos_id=eos)
    assert got[1] == decode.Continuation([eos], "eos")
    for prompt, g in zip(prompts, got, strict=True):
        want = _greedy_reference(params, c, prompt, 6, eos)
        assert g.tokens == want and g.stopped == ("eos" if want[-1] == eos else "length")


def test_weights_cast_once_compute_exactly_what_the_model_casts_and_keep_their_shardings():
    c = dataclasses.replace(BASE, dtype="bfloat16", qk_norm="head", qkv_bias=True, norm="layernorm1p")
    params = _params(c)
    cast = decode.compute_params(params, c)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(cast), strict=True):
        name = path[-1].key
        assert y.dtype == (jnp.float32 if "norm" in name else jnp.bfloat16), name
        np.testing.assert_array_equal(np.asarray(y), np.asarray(x.astype(y.dtype)))
    lengths = np.array([3, 5])
    prompts = np.asarray(jax.random.randint(jax.random.key(3), (2, 5), 0, c.vocab_size))
    prefill = jax.jit(decode.prefill, static_argnums=(4,))
    step = jax.jit(decode.decode_step, static_argnums=(4,))
    logits = {}
    for which, p in (("fp32", params), ("cast", cast)):
        first, cache = prefill(p, decode.init_cache(c, 2, 12), prompts, lengths, c)
        nxt, _ = step(p, cache, jnp.argmax(first, -1), lengths, c)
        logits[which] = (np.asarray(first), np.asarray(nxt))
    np.testing.assert_array_equal(logits["fp32"][0], logits["cast"][0])
    np.testing.assert_array_equal(logits["fp32"][1], logits["cast"][1])
    generator = decode.Generator(c)
    rows = [[5, 9, 2], [11, 4, 4, 60, 1]]
    assert generator.generate(params, rows, 8) == generator.generate(cast, rows, 8)

    cfg = config.default_config()
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    mesh, rules = sharding.make_mesh(cfg.mesh), sharding.rules_from_config(cfg.mesh)
    sharded = jax.device_put(params, sharding.param_shardings(model.abstract_params(c), model.logical_axes(c),
                                                              mesh, rules))
    got = jax.tree.leaves(decode.compute_params(sharded, c))
    assert [x.sharding for x in got] == [x.sharding for x in jax.tree.leaves(sharded)]


def test_prompt_lengths_in_one_bucket_and_any_temperature_share_the_compiled_programs(monkeypatch):
    c = dataclasses.replace(BASE, max_seq_len=48)  # a model no other test decodes: nothing compiled yet
    params = _params(c)
    traces = {"prefill": 0, "decode_step": 0}

    def counting(name, f):
        def counted(*args):
            traces[name] += 1
            return f(*args)
        return counted

    for name in traces:
        monkeypatch.setattr(decode, name, counting(name, getattr(decode, name)))
    generator = decode.Generator(c)
    rng = np.random.default_rng(0)
    short, long = [rng.integers(0, 96, n).tolist() for n in (17, 29)]  # both pad to 32
    assert decode.padded_length(17, 6, 48) == decode.padded_length(29, 6, 48) == 32
    assert decode.padded_length(29, 19, 48) == 29  # capped: 32 + 19 would not fit in max_seq_len
    for prompts in ([short, [3, 1]], [long, [7]]):
        got = generator.generate(params, prompts, 6)
        assert [g.tokens for g in got] == [_greedy_reference(params, c, p, 6, None, width=48) for p in prompts]
    assert traces == {"prefill": 1, "decode_step": 1}
    draws = [generator.generate(params, prompts, 6, temperature=t, top_p=0.9, seed=1)
             for prompts in ([short], [long]) for t in (0.7, 1.3)]
    assert traces == {"prefill": 2, "decode_step": 2}  # sampling is one more program, whatever the temperature
    assert draws[0] != draws[1]  # the temperature is an argument that counts


def test_choose_greedy_top_p_temperature_and_vocab_limit():
    logits = jnp.asarray([[0.0, 3.0, 2.9, -1.0, 9.0], [1.0, 0.0, 0.5, 2.0, 0.0]])
    key = jax.random.key(0)
    assert decode.choose(logits, key, 0.0, 1.0, None).tolist() == [4, 3]
    assert decode.choose(logits, key, 0.0, 1.0, 4).tolist() == [1, 3]  # id 4 has no token
    assert decode.choose(logits, key, 1.0, 1e-6, 4).tolist() == [1, 3]  # a tiny nucleus: only the top token
    draws = np.stack([np.asarray(decode.choose(logits, jax.random.key(s), 1.0, 1.0, 4)) for s in range(200)])
    assert (draws < 4).all() and len(set(draws[:, 1].tolist())) == 4  # every allowed token comes up
    again = np.stack([np.asarray(decode.choose(logits, jax.random.key(s), 1.0, 1.0, 4)) for s in range(200)])
    np.testing.assert_array_equal(draws, again)  # the seed decides
    nucleus = np.stack([np.asarray(decode.choose(logits, jax.random.key(s), 1.0, 0.6, None)) for s in range(200)])
    assert set(nucleus[:, 1].tolist()) <= {0, 3}  # row 2: p(3) = 0.47, with 0 it passes 0.6


def test_prompt_tokens_refuse_an_empty_prompt_and_one_too_long(sp_path):
    tok = load_tokenizer(sp_path)
    ids = decode.prompt_tokens(tok, ["the model reads", "data"], max_new_tokens=4, max_seq_len=64)
    assert [len(i) for i in ids] == [len(tok.encode_batch(["the model reads"])[0]), len(tok.encode_batch(["data"])[0])]
    with pytest.raises(ConfigError, match=r"^--prompt 2 \(''\): tokenizes to no tokens"):
        decode.prompt_tokens(tok, ["data", ""], max_new_tokens=4, max_seq_len=64)
    n = len(ids[0])
    with pytest.raises(ConfigError, match=rf"^--max_new_tokens: 62 after the {n} tokens of --prompt 1 exceeds the "
                                          rf"model's max_seq_len 64, expected at most {64 - n}$"):
        decode.prompt_tokens(tok, ["the model reads"], max_new_tokens=62, max_seq_len=64)
    with pytest.raises(ConfigError, match=r"^--max_new_tokens: 0, expected a positive integer"):
        decode.prompt_tokens(tok, ["data"], max_new_tokens=0, max_seq_len=64)
    # Without max_new_tokens (the caller fills what is left) a prompt must leave room for one token.
    assert decode.prompt_tokens(tok, ["the model reads"], max_new_tokens=None, max_seq_len=n + 1) == ids[:1]
    with pytest.raises(ConfigError, match=rf"^--prompt 1: {n} tokens, too long for the model's max_seq_len {n}, "
                                          rf"expected at most {n - 1} to leave room for a new token$"):
        decode.prompt_tokens(tok, ["the model reads"], max_new_tokens=None, max_seq_len=n)
