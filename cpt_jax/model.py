"""Decoder-only transformer of the Llama family, in Flax NNX, with the variants of the families the
README's model table lists (Qwen2/3, OLMo 2, Nemotron): the options of ModelConfig.

Parameters of the blocks are stored stacked along a leading 'layers' axis whether or not the
blocks run under `lax.scan`, so a checkpoint does not depend on `scan_layers`. The NNX module
owns the parameters, their init and their logical axis names; the computation is a pure function
of the parameter pytree (`forward`), which is what the jitted train step differentiates.

Shapes in names: B batch, T length, D d_model, N query heads, K kv heads, H head_dim, F d_ff,
V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.config import ConfigError

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture; mirrors the `model` config section (see config.default_config)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_ff: int
    vocab_size: int
    max_seq_len: int
    head_dim: int = 0
    rope_theta: float = 10000.0
    rope_scaling: str = "none"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    partial_rotary_factor: float = 1.0
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    qk_norm: str = "none"
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    init_std: float = 0.02
    scan_layers: bool = True
    remat: str = "none"
    attention: str = "auto"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelConfig:
        """From the `model` config section (a ConfigDict or a plain dict, e.g. checkpoint metadata)."""
        d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def hd(self) -> int:
        """Per-head width."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def rotary_dim(self) -> int:
        """Leading dimensions of each head that RoPE rotates (the rest pass through)."""
        return int(self.hd * self.partial_rotary_factor)

    def num_params(self, include_embedding: bool = True) -> int:
        """Parameter count (the input embedding is excluded when include_embedding is False)."""
        D, N, K, H, V = self.d_model, self.n_heads, self.n_kv_heads, self.hd, self.vocab_size
        norm = D * (1 if self.norm == "rmsnorm" else 2)
        bias = N * H + 2 * K * H if self.qkv_bias else 0
        qk_norm = {"none": 0, "head": 2 * H, "projection": (N + K) * H}[self.qk_norm]
        tied_head = D * V if self.tie_embeddings else 0  # counted by matmul_params, stored as the embedding
        embed = V * D if include_embedding else 0
        return matmul_params(self) - tied_head + self.n_layers * (bias + qk_norm + 2 * norm) + norm + embed


def matmul_params(c: ModelConfig) -> int:
    """Weights that multiply every token: the blocks' projections and the output head (tied or not:
    its matmul runs either way). What `flops` counts; norms, biases and the embedding lookup are not."""
    D, N, K, H, F = c.d_model, c.n_heads, c.n_kv_heads, c.hd, c.d_ff
    attention = D * N * H + 2 * D * K * H + N * H * D  # wq, wk + wv, wo
    mlp = (3 if c.mlp == "swiglu" else 2) * D * F  # (w_gate,) w_up, w_down
    return c.n_layers * (attention + mlp) + D * c.vocab_size


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], std: float, dtype) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), logical_axes=names)


def _const(shape: tuple[int, ...], names: tuple[str | None, ...], value: float, dtype) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, dtype), logical_axes=names)


def _norm_scale_init(c: ModelConfig) -> float:
    # layernorm1p stores the offset w of its 1 + w scale: 0 is the identity scale, and weight decay
    # pulls the scale towards 1 rather than 0.
    return 0.0 if c.norm == "layernorm1p" else 1.0


class Blocks(nnx.Module):
    """The parameters of all transformer blocks, stacked along a leading 'layers' axis."""

    def __init__(self, c: ModelConfig, rngs: nnx.Rngs):
        L, D, N, K, H, F = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.hd, c.d_ff
        dt = jnp.dtype(c.param_dtype)
        std, out_std = c.init_std, c.init_std / math.sqrt(2 * L)
        # With norm_position 'post' (OLMo 2) these norm the attention and MLP outputs, not their inputs.
        one = _norm_scale_init(c)
        self.attn_norm_scale = _const((L, D), ("layers", "norm"), one, dt)
        self.mlp_norm_scale = _const((L, D), ("layers", "norm"), one, dt)
        if c.norm != "rmsnorm":
            self.attn_norm_bias = _const((L, D), ("layers", "norm"), 0.0, dt)
            self.mlp_norm_bias = _const((L, D), ("layers", "norm"), 0.0, dt)
        if c.qk_norm == "head":  # one scale over head_dim, shared by every head (Qwen3)
            self.q_norm_scale = _const((L, H), ("layers", "head_dim"), 1.0, dt)
            self.k_norm_scale = _const((L, H), ("layers", "head_dim"), 1.0, dt)
        elif c.qk_norm == "projection":  # over the whole q and k projections (OLMo 2)
            self.q_norm_scale = _const((L, N, H), ("layers", "heads", "head_dim"), 1.0, dt)
            self.k_norm_scale = _const((L, K, H), ("layers", "kv_heads", "head_dim"), 1.0, dt)
        self.wq = _param(rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), std, dt)
        self.wk = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        self.wv = _param(rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt)
        self.wo = _param(rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), out_std, dt)
        if c.qkv_bias:
            self.bq = _const((L, N, H), ("layers", "heads", "head_dim"), 0.0, dt)
            self.bk = _const((L, K, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
            self.bv = _const((L, K, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
        if c.mlp == "swiglu":
            self.w_gate = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
        self.w_up = _param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
        self.w_down = _param(rngs, (L, F, D), ("layers", "mlp", "embed"), out_std, dt)


class Decoder(nnx.Module):
    """The language model. `model(tokens)` returns logits [B, T, V] in the compute dtype's fp32."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, rules: tuple = ()):
        c = config
        dt = jnp.dtype(c.param_dtype)
        self.config = c
        # Activation sharding rules (logical name -> mesh axes), static: part of the graph def.
        self.rules = tuple(rules)
        self.embed = _param(rngs, (c.vocab_size, c.d_model), ("vocab", "embed"), c.init_std, dt)
        self.layers = Blocks(c, rngs)
        self.final_norm_scale = _const((c.d_model,), ("norm",), _norm_scale_init(c), dt)
        if c.norm != "rmsnorm":
            self.final_norm_bias = _const((c.d_model,), ("norm",), 0.0, dt)
        if not c.tie_embeddings:
            self.lm_head = _param(rngs, (c.d_model, c.vocab_size), ("embed", "vocab"), c.init_std, dt)

    def __call__(self, tokens, segment_ids=None, positions=None, dtype: str | None = None):
        c = dataclasses.replace(self.config, dtype=dtype) if dtype else self.config
        return apply(nnx.to_pure_dict(nnx.state(self, nnx.Param)), tokens, c, segment_ids, positions, self.rules)


def init_params(config: ModelConfig, seed: int) -> Params:
    """A fresh parameter pytree (pure dict), deterministic in the seed."""
    return nnx.to_pure_dict(nnx.state(Decoder(config, rngs=nnx.Rngs(params=seed)), nnx.Param))


def logical_axes(config: ModelConfig) -> Params:
    """The logical axis names of every parameter, as a pytree of tuples matching init_params."""
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(params=0)))
    state = nnx.state(abstract, nnx.Param)
    names = jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(names)


def abstract_params(config: ModelConfig) -> Params:
    """ShapeDtypeStructs of every parameter (no memory allocated)."""
    return jax.eval_shape(lambda: init_params(config, 0))


def constrain(x: jax.Array, names: tuple[str | None, ...], rules: tuple) -> jax.Array:
    """Shard an activation by logical names, when a mesh is set (no-op outside a mesh)."""
    if not rules or jax.sharding.get_abstract_mesh().empty:
        return x
    table = dict(rules)
    spec = jax.sharding.PartitionSpec(*(table.get(n) if n else None for n in names))
    return jax.lax.with_sharding_constraint(x, spec)


def is_compute_weight(name: str) -> bool:
    """Whether the parameter `name` (a leaf's key, e.g. 'wq') is cast to the compute dtype before
    use: every one but the norm scales and biases, which `_norm` reads in fp32. Casting these once
    ahead (as decoding does) computes exactly what the casts below compute."""
    return "norm" not in name


def _norm(x, scale, bias, c: ModelConfig, kind: str | None = None, axes: tuple[int, ...] = (-1,)):
    """`kind` (default c.norm) over `axes`; statistics in fp32 whatever the compute dtype (a bf16
    variance loses too much precision)."""
    kind = kind or c.norm
    x32 = x.astype(jnp.float32)
    if kind != "rmsnorm":
        x32 = x32 - x32.mean(axes, keepdims=True)
    y = x32 * jax.lax.rsqrt((x32 * x32).mean(axes, keepdims=True) + c.norm_eps)
    w = scale.astype(jnp.float32)
    y = y * (w + 1.0 if kind == "layernorm1p" else w)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(c.dtype)


def rope_frequencies(c: ModelConfig) -> np.ndarray:
    """Inverse frequencies [rotary_dim/2] after the configured scaling (Llama 3.1 'llama3' or 'linear')."""
    R = c.rotary_dim
    inv = 1.0 / (c.rope_theta ** (np.arange(0, R, 2, dtype=np.float64) / R))
    if c.rope_scaling == "linear":
        inv = inv / c.rope_factor
    elif c.rope_scaling == "llama3":
        low_wl = c.rope_original_max_seq_len / c.rope_low_freq_factor
        high_wl = c.rope_original_max_seq_len / c.rope_high_freq_factor
        wavelen = 2 * np.pi / inv
        scaled = np.where(wavelen > low_wl, inv / c.rope_factor, inv)
        smooth = ((c.rope_original_max_seq_len / wavelen - c.rope_low_freq_factor)
                  / (c.rope_high_freq_factor - c.rope_low_freq_factor))
        smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rope_tables(positions_BT: jax.Array, c: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """(cos, sin) [B, T, 1, rotary_dim/2] of the positions."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(rope_frequencies(c))
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def _rope(x_BTnH, cos_BT1h, sin_BT1h):
    # "Rotate half" pairing (first half with second half) within the rotated leading dimensions,
    # the convention of HF Llama weights; the rest of the head passes through (partial rotary).
    R = 2 * cos_BT1h.shape[-1]
    x = x_BTnH.astype(jnp.float32)
    x1, x2 = jnp.split(x[..., :R], 2, axis=-1)
    out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h, x[..., R:]], axis=-1)
    return out.astype(x_BTnH.dtype)


def attention_implementation(c: ModelConfig, platform: str | None = None) -> str:
    """What `model.attention` runs on `platform` (default: JAX's default backend): 'xla' or 'cudnn'.

    'auto' is XLA on every platform: cuDNN's fused kernel with this model's document masks has
    not yet run on a GPU here (benchmarks/gpu_h200.sh checks its output, gradients and speed
    against XLA), and a default must not be a path no one has run. 'cudnn' asks for it: a
    ConfigError off NVIDIA GPUs or for a model it cannot take, before anything compiles.
    """
    if c.attention in ("auto", "xla"):
        return "xla"
    platform = platform or jax.default_backend()
    if platform != "gpu":
        raise ConfigError(f"model.attention: 'cudnn' on {platform} devices, expected 'auto' or 'xla' "
                          f"(cuDNN's fused attention runs on NVIDIA GPUs only)")
    if c.dtype not in ("bfloat16", "float16"):
        reason = f"model.dtype is {c.dtype!r}, cuDNN's fused attention takes bfloat16 or float16"
    elif c.hd % 8 or c.hd > 128:
        reason = f"the head width is {c.hd}, cuDNN's fused attention takes multiples of 8 up to 128"
    else:
        return "cudnn"
    raise ConfigError(f"model.attention: 'cudnn', but {reason}; expected 'auto' or 'xla' for this model")


def _attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, c: ModelConfig):
    # Causality goes in as is_causal, not folded into the mask: cuDNN then runs its causal kernel
    # (which skips the upper triangle) and takes only the documents' mask as a bias; XLA computes
    # the same either way.
    same_doc_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=same_doc_B1TT, is_causal=True,
                                        implementation=attention_implementation(c))


def attention_inputs(p: Params, x_BTD, cos, sin, c: ModelConfig, rules: tuple = ()):
    """(q [B,T,N,H], k [B,T,K,H], v [B,T,K,H]) of one block (`p`: its slice of params['layers'])."""
    dt = c.dtype
    h = x_BTD if c.norm_position == "post" else _norm(x_BTD, p["attn_norm_scale"], p.get("attn_norm_bias"), c)
    q = jnp.einsum("btd,dnh->btnh", h, p["wq"].astype(dt))
    k = jnp.einsum("btd,dkh->btkh", h, p["wk"].astype(dt))
    v = jnp.einsum("btd,dkh->btkh", h, p["wv"].astype(dt))
    if c.qkv_bias:
        q, k, v = q + p["bq"].astype(dt), k + p["bk"].astype(dt), v + p["bv"].astype(dt)
    if c.qk_norm != "none":
        axes = (-1,) if c.qk_norm == "head" else (-2, -1)
        q = _norm(q, p["q_norm_scale"], None, c, "rmsnorm", axes)
        k = _norm(k, p["k_norm_scale"], None, c, "rmsnorm", axes)
    q = constrain(_rope(q, cos, sin), ("batch", "length", "act_heads", None), rules)
    k = constrain(_rope(k, cos, sin), ("batch", "length", "act_kv_heads", None), rules)
    return q, k, v


def block_output(p: Params, x_BTD, o_BTNH, c: ModelConfig, rules: tuple = ()):
    """The residual stream after one block, from its input and its attention output (per head)."""
    dt = c.dtype
    post = c.norm_position == "post"
    a = jnp.einsum("btnh,nhd->btd", o_BTNH, p["wo"].astype(dt))
    if post:
        a = _norm(a, p["attn_norm_scale"], p.get("attn_norm_bias"), c)
    x_BTD = constrain(x_BTD + a, ("batch", "length", "act_embed"), rules)

    h = x_BTD if post else _norm(x_BTD, p["mlp_norm_scale"], p.get("mlp_norm_bias"), c)
    up = jnp.einsum("btd,df->btf", h, p["w_up"].astype(dt))
    if c.mlp == "swiglu":
        gate = jnp.einsum("btd,df->btf", h, p["w_gate"].astype(dt))
        a = jax.nn.silu(gate) * up
    else:
        a = jnp.square(jax.nn.relu(up))
    a = constrain(a, ("batch", "length", "act_mlp"), rules)
    m = jnp.einsum("btf,fd->btd", a, p["w_down"].astype(dt))
    if post:
        m = _norm(m, p["mlp_norm_scale"], p.get("mlp_norm_bias"), c)
    return constrain(x_BTD + m, ("batch", "length", "act_embed"), rules)


def embed(params: Params, tokens_BT: jax.Array, c: ModelConfig, rules: tuple = ()) -> jax.Array:
    """Input embeddings [B, T, D] in the compute dtype."""
    x = jnp.take(params["embed"], tokens_BT, axis=0).astype(c.dtype)
    return constrain(x, ("batch", "length", "act_embed"), rules)


_REMAT_POLICIES = {
    "full": None,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def forward(params: Params, tokens_BT: jax.Array, c: ModelConfig, segment_ids_BT: jax.Array | None = None,
            positions_BT: jax.Array | None = None, rules: tuple = ()) -> jax.Array:
    """Final hidden states [B, T, D] (after the final norm) in the compute dtype."""
    B, T = tokens_BT.shape
    if segment_ids_BT is None:
        segment_ids_BT = jnp.ones((B, T), jnp.int32)
    if positions_BT is None:
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = rope_tables(positions_BT, c)
    x = embed(params, tokens_BT, c, rules)

    def block(x, p):
        q, k, v = attention_inputs(p, x, cos, sin, c, rules)
        return block_output(p, x, _attention(q, k, v, segment_ids_BT, c), c, rules)

    if c.remat != "none":
        block = jax.checkpoint(block, policy=_REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    layers = params["layers"]
    if c.scan_layers:
        x, _ = jax.lax.scan(lambda x, p: (block(x, p), None), x, layers)
    else:
        for i in range(c.n_layers):
            x = block(x, jax.tree.map(lambda a, i=i: a[i], layers))
    return final_norm(params, x, c)


def final_norm(params: Params, x_BTD: jax.Array, c: ModelConfig) -> jax.Array:
    """The final norm of the residual stream (before the output head); decoding applies it too."""
    return _norm(x_BTD, params["final_norm_scale"], params.get("final_norm_bias"), c)


def head_weights(params: Params, c: ModelConfig) -> jax.Array:
    """The output projection [D, V] (the transposed embedding when tied)."""
    return params["embed"].T if c.tie_embeddings else params["lm_head"]


def logits_from_hidden(params: Params, hidden_BTD: jax.Array, c: ModelConfig) -> jax.Array:
    """Logits [B, T, V] in fp32."""
    w = head_weights(params, c).astype(c.dtype)
    return jnp.einsum("btd,dv->btv", hidden_BTD, w, preferred_element_type=jnp.float32)


def apply(params: Params, tokens_BT, c: ModelConfig, segment_ids_BT=None, positions_BT=None, rules=()):
    """Logits [B, T, V] (fp32) from a parameter pytree: the functional form of Decoder.__call__."""
    hidden = forward(params, tokens_BT, c, segment_ids_BT, positions_BT, rules)
    return logits_from_hidden(params, hidden, c)
