"""Autoregressive decoding with a KV cache: prefill a batch of prompts, then one jitted step per token.

The cache, {"k", "v"}: [L, B, S, K, H] in the compute dtype, is sharded like the activations.
Prompts are right-padded to the longest: row b's first new token sits at position len_b and a
query at position p attends to the cached positions <= p, so whatever the padding left in the cache
is overwritten by the row's own tokens before any query reaches it. The blocks are the training
model's (`model.attention_inputs`, `model.block_output`), so a cached decode computes what a full
forward pass computes (tested at every position). `Generator` compiles per power-of-two bucket of
prompt lengths and per kind of choice (greedy or sampling, nucleus or not), never per temperature
or top_p, and dispatches each step before reading the previous one's tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cpt_jax import model, sharding
from cpt_jax.config import ConfigError
from cpt_jax.model import ModelConfig, Params
from cpt_jax.scoring import Placement, bucket_length, positive, round_up

Cache = dict[str, jax.Array]
_CACHE_NAMES = ("layers", "batch", "length", "act_kv_heads", None)


def init_cache(c: ModelConfig, batch: int, length: int) -> Cache:
    """An empty cache for `batch` rows of up to `length` positions (zeros, never attended)."""
    shape = (c.n_layers, batch, length, c.n_kv_heads, c.hd)
    return {"k": jnp.zeros(shape, c.dtype), "v": jnp.zeros(shape, c.dtype)}


def _layers(params: Params, x_BTD, positions_BT, cache: Cache, c: ModelConfig, rules: tuple):
    """Every block on x (rows at contiguous positions starting at positions_BT[:, 0]): each layer
    writes its keys and values into the cache there and attends to the cached positions <= the
    query's. Returns (final hidden states [B, T, D], the updated cache)."""
    cos, sin = model.rope_tables(positions_BT, c)
    S = cache["k"].shape[2]
    mask_B1TS = (jnp.arange(S)[None, None, :] <= positions_BT[:, :, None])[:, None]
    start_B = positions_BT[:, 0]
    write = jax.vmap(lambda old, new, at: jax.lax.dynamic_update_slice(old, new, (at, 0, 0)))

    def layer(x, xs):
        p, k_cache, v_cache = xs
        q, k, v = model.attention_inputs(p, x, cos, sin, c, rules)
        k_cache = model.constrain(write(k_cache, k.astype(k_cache.dtype), start_B), _CACHE_NAMES[1:], rules)
        v_cache = model.constrain(write(v_cache, v.astype(v_cache.dtype), start_B), _CACHE_NAMES[1:], rules)
        # XLA's attention: cuDNN's fused kernel wants equal query and key lengths.
        o = jax.nn.dot_product_attention(q, k_cache, v_cache, mask=mask_B1TS, implementation="xla")
        return model.block_output(p, x, o, c, rules), (k_cache, v_cache)

    x, (k, v) = jax.lax.scan(layer, x_BTD, (params["layers"], cache["k"], cache["v"]))
    return model.final_norm(params, x, c), {"k": k, "v": v}


def prefill(params: Params, cache: Cache, tokens_BP, lengths_B, c: ModelConfig, rules: tuple = ()):
    """Run the prompts (right-padded to P) through the model, filling the cache at positions
    [0, P). Returns (fp32 logits [B, V] at each row's last prompt position, cache)."""
    B, P = tokens_BP.shape
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    hidden, cache = _layers(params, model.embed(params, tokens_BP, c, rules), positions, cache, c, rules)
    last = jnp.take_along_axis(hidden, (lengths_B - 1)[:, None, None].astype(jnp.int32), axis=1)
    return model.logits_from_hidden(params, last, c)[:, 0], cache


def decode_step(params: Params, cache: Cache, tokens_B, positions_B, c: ModelConfig, rules: tuple = ()):
    """One new token per row at its position. Returns (fp32 logits [B, V] of the next token, cache)."""
    positions = positions_B[:, None].astype(jnp.int32)
    hidden, cache = _layers(params, model.embed(params, tokens_B[:, None], c, rules), positions, cache, c, rules)
    return model.logits_from_hidden(params, hidden, c)[:, 0], cache


def choose(logits_BV, key, temperature, top_p, vocab_limit: int | None, *, greedy: bool | None = None,
           nucleus: bool | None = None):
    """Next tokens [B]: argmax at temperature 0; else a sample from softmax(logits / temperature)
    restricted to the smallest set of tokens whose probability reaches top_p. Ids from
    `vocab_limit` on (embedding rows the tokenizer has no token for) are never chosen.

    `temperature` and `top_p` may be traced scalars when `greedy` (temperature is 0) and `nucleus`
    (top_p < 1) say statically which of these computations to build."""
    greedy = temperature == 0 if greedy is None else greedy
    nucleus = top_p < 1 if nucleus is None else nucleus
    logits = logits_BV.astype(jnp.float32)
    V = logits.shape[-1]
    if vocab_limit is not None and vocab_limit < V:
        logits = jnp.where(jnp.arange(V) < vocab_limit, logits, -jnp.inf)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if nucleus:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p  # the most likely token always stays
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def compute_params(params: Params, c: ModelConfig) -> Params:
    """`params` with every compute weight (model.is_compute_weight) in the compute dtype, each
    sharded as it was; the norms stay as they are. Decoding is memory-bound: casting once per
    generation instead of inside every step halves the weight bytes a bfloat16 step reads from
    float32 parameters, and computes exactly the same (the model casts them before use anyway)."""

    def cast(path, x):
        return x.astype(c.dtype) if model.is_compute_weight(str(path[-1].key)) else x

    return jax.tree_util.tree_map_with_path(cast, params)


def padded_length(longest: int, max_new_tokens: int, max_seq_len: int) -> int:
    """The prompt length the programs are compiled for: the longest prompt's bucket_length, capped
    so that it plus max_new_tokens still fits in max_seq_len."""
    return max(longest, min(bucket_length(longest), max_seq_len - max_new_tokens))


@dataclasses.dataclass(frozen=True)
class Continuation:
    """What one prompt was continued with: the new token ids (ending with EOS when `stopped` is
    'eos'; 'length' when max_new_tokens ran out first)."""

    tokens: list[int]
    stopped: str


@functools.lru_cache(maxsize=16)
def _programs(c: ModelConfig, rules: tuple, greedy: bool, nucleus: bool, vocab_limit: int | None,
              mesh: jax.sharding.Mesh | None):
    """(init, prefill, step) jitted for one model and kind of choice (greedy or sampling, with or
    without a nucleus; the temperature and top_p themselves are arguments); the cache is donated.
    Each returns (tokens, their positions, cache), so positions stay on the device. With a mesh the
    cache is sharded like activations and the tokens and positions come back replicated, so every
    process can read them."""

    def pick(logits, key, temperature, top_p):
        return choose(logits, key, temperature, top_p, vocab_limit, greedy=greedy, nucleus=nucleus)

    def first(params, cache, tokens, lengths, key, temperature, top_p):
        logits, cache = prefill(params, cache, tokens, lengths, c, rules)
        return pick(logits, jax.random.fold_in(key, 0), temperature, top_p), lengths.astype(jnp.int32), cache

    def step(params, cache, tokens, positions, key, t, temperature, top_p):
        logits, cache = decode_step(params, cache, tokens, positions, c, rules)
        return pick(logits, jax.random.fold_in(key, t), temperature, top_p), positions + 1, cache

    cache_sharding = out = None
    if mesh is not None:
        spec = jax.sharding.NamedSharding(mesh, sharding.spec_for(_CACHE_NAMES, dict(rules)))
        cache_sharding = {"k": spec, "v": spec}
        out = (sharding.replicated(mesh), sharding.replicated(mesh), cache_sharding)
    return (jax.jit(init_cache, static_argnums=(0, 1, 2), out_shardings=cache_sharding),
            jax.jit(first, donate_argnums=(1,), out_shardings=out),
            jax.jit(step, donate_argnums=(1,), out_shardings=out))


class Generator:
    """Continues batches of token-id prompts with one model: with a mesh, the batch is split over
    its batch axes (padded with dummy rows) and the parameters are used as they are sharded.
    `vocab_limit` (the tokenizer's vocabulary size) keeps out ids the tokenizer cannot decode."""

    def __init__(self, c: ModelConfig, *, mesh: jax.sharding.Mesh | None = None, rules: dict | None = None,
                 vocab_limit: int | None = None):
        self.model_config = c
        self.placement = Placement(mesh, rules)
        self.vocab_limit = vocab_limit

    def generate(self, params: Params, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 eos_id: int | None = None) -> list[Continuation]:
        """Up to `max_new_tokens` new tokens per prompt. Each prompt is non-empty and its length
        plus max_new_tokens is at most the model's max_seq_len (callers check, naming their keys).
        Float32 `params` are cast to the compute dtype once here (compute_params); pass them cast
        already to spare that copy."""
        c = self.model_config
        n = len(prompts)
        where = self.placement
        B = round_up(n, where.ways)
        P = padded_length(max(len(p) for p in prompts), max_new_tokens, c.max_seq_len)
        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones(B, np.int32)  # dummy rows: one padding token
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
        init, first, step = _programs(c, where.rules_tuple, temperature == 0, top_p < 1, self.vocab_limit, where.mesh)
        key = jax.random.key(seed)
        knobs = (np.float32(temperature), np.float32(top_p))
        out: list[list[int]] = [[] for _ in range(n)]
        stopped = ["length"] * n
        with where.context():
            params = compute_params(params, c)
            cache = init(c, B, P + max_new_tokens)
            new, positions, cache = first(params, cache, where.put(tokens), where.put(lengths, ("batch",)), key, *knobs)
            for t in range(max_new_tokens):
                # Dispatch the next step before reading this one's tokens, so the device never waits
                # on the host; a batch that has stopped costs at most that one step more.
                chosen = new
                if t + 1 < max_new_tokens:
                    new, positions, cache = step(params, cache, chosen, positions, key, np.int32(t + 1), *knobs)
                chosen = np.asarray(jax.device_get(chosen))
                for i in range(n):
                    if stopped[i] != "eos":
                        out[i].append(int(chosen[i]))
                        if chosen[i] == eos_id:
                            stopped[i] = "eos"
                if "length" not in stopped:
                    break
        return [Continuation(tokens, why) for tokens, why in zip(out, stopped, strict=True)]


def prompt_tokens(tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int | None, max_seq_len: int,
                  add_bos: bool = False, prompt_key: str = "--prompt",
                  tokens_key: str = "--max_new_tokens") -> list[list[int]]:
    """Token ids of each prompt (after the tokenizer's BOS with `add_bos`). ConfigError, naming the
    keys, for a prompt that tokenizes to nothing or one whose length plus max_new_tokens exceeds
    max_seq_len; with max_new_tokens None (the caller sizes it to what fits), for a prompt that
    leaves no room for a new token."""
    if max_new_tokens is not None:
        positive(tokens_key, max_new_tokens)
    if add_bos and tokenizer.bos_id is None:
        raise ConfigError(f"--add_bos: tokenizer {tokenizer.path} has no BOS token, expected one")
    out = []
    for i, (text, ids) in enumerate(zip(prompts, tokenizer.encode_batch(list(prompts), num_threads=1),
                                        strict=True)):
        ids = ([tokenizer.bos_id] if add_bos else []) + [int(t) for t in ids]
        if not ids:
            raise ConfigError(f"{prompt_key} {i + 1} ({text!r}): tokenizes to no tokens, expected a prompt with at "
                              "least one token")
        if max_new_tokens is None and len(ids) >= max_seq_len:
            raise ConfigError(f"{prompt_key} {i + 1}: {len(ids)} tokens, too long for the model's max_seq_len "
                              f"{max_seq_len}, expected at most {max_seq_len - 1} to leave room for a new token")
        if max_new_tokens is not None and len(ids) + max_new_tokens > max_seq_len:
            raise ConfigError(f"{tokens_key}: {max_new_tokens} after the {len(ids)} tokens of {prompt_key} {i + 1} "
                              f"exceeds the model's max_seq_len {max_seq_len}, expected at most "
                              f"{max(max_seq_len - len(ids), 0)}")
        out.append(ids)
    return out


class SampleEvaluator:
    """Greedy continuations of fixed prompts, for a run's periodic evaluation (eval.sample_prompts):
    the prompts are tokenized and checked at construction, before anything is compiled."""

    def __init__(self, prompts: Sequence[str], tokenizer: Any, model_config: ModelConfig, *, max_new_tokens: int,
                 mesh: jax.sharding.Mesh | None = None, rules: dict | None = None, add_bos: bool = False):
        if tokenizer.vocab_size > model_config.vocab_size:
            raise ConfigError(f"eval.sample_prompts: tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, "
                              f"expected at most model.vocab_size {model_config.vocab_size}")
        self.prompts = [str(p) for p in prompts]
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.ids = prompt_tokens(tokenizer, self.prompts, max_new_tokens=max_new_tokens,
                                 max_seq_len=model_config.max_seq_len, prompt_key="eval.sample_prompts",
                                 tokens_key="eval.sample_max_new_tokens", add_bos=add_bos)
        self.generator = Generator(model_config, mesh=mesh, rules=rules, vocab_limit=tokenizer.vocab_size)

    def evaluate(self, params: Params) -> list[dict[str, str]]:
        """[{"prompt", "continuation"}] (the continuation's text, without its EOS)."""
        outs = self.generator.generate(params, self.ids, self.max_new_tokens, eos_id=self.tokenizer.eos_id)
        return [{"prompt": p, "continuation": text_of(self.tokenizer, o)} for p, o in zip(self.prompts, outs,
                                                                                          strict=True)]


def text_of(tokenizer: Any, continuation: Continuation) -> str:
    """The text of a continuation, without the EOS that ended it."""
    ids = continuation.tokens[:-1] if continuation.stopped == "eos" else continuation.tokens
    return tokenizer.decode(ids)
