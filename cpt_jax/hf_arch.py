"""Hugging Face architectures as cpt_jax model configs: config.json <-> ModelConfig, tensor names.

FAMILIES holds what sets each supported architecture apart (the README's table: Llama, Mistral,
Qwen2, Qwen3, OLMo 2, Nemotron), computed as transformers 5.x's modeling code does it. What a
config.json asks for that cpt_jax does not compute is refused with one line naming it:
sliding-window layers (Qwen3), mixture-of-experts layers, rope types other than default, linear
and llama3, biases on o_proj or the MLP, another activation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cpt_jax import model
from cpt_jax.config import ConfigError
from cpt_jax.data.tokenization import Tokenizer


@dataclasses.dataclass(frozen=True)
class Family:
    """What cpt_jax knows of one Hugging Face architecture (transformers' defaults where config.json
    may leave a key out). Adding a family is one entry of FAMILIES (and a model in the tests)."""

    model_type: str  # config.json's model_type
    options: dict[str, Any]  # the ModelConfig options that tell the families apart
    hidden_act: str = "silu"
    eps_key: str = "rms_norm_eps"  # the config.json key of the norm epsilon
    eps_default: float = 1e-6
    head_dim_default: int | None = None  # None: hidden_size / num_attention_heads
    partial_rotary_default: float | None = None  # None: RoPE on whole heads only
    max_len_default: int = 2048  # max_position_embeddings
    # '' none; 'every_layer': sliding_window applies to every layer (Mistral); 'opt_in': to every
    # layer when use_sliding_window (Qwen2); 'per_layer': layers may slide (Qwen3; refused).
    sliding_window: str = ""
    export_fixed: dict[str, Any] = dataclasses.field(default_factory=dict)  # config.json keys an export writes
    export_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)  # ... unless the import had them
    default_export: bool = True  # False: a model exports as it only when it was imported from it


# An export picks the first family whose options all match the model (Mistral only for a model
# imported from Mistral); an option a family leaves out (Nemotron's partial_rotary_factor) may take
# any value.
_SWIGLU = dict(mlp="swiglu", norm="rmsnorm", norm_position="pre", qk_norm="none", qkv_bias=False,
               partial_rotary_factor=1.0)
_NO_BIASES = {"attention_bias": False, "mlp_bias": False}
_NO_SLIDING = {"use_sliding_window": False, "sliding_window": None}
FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", _SWIGLU, export_fixed=_NO_BIASES, export_defaults={"pretraining_tp": 1}),
    "MistralForCausalLM": Family("mistral", _SWIGLU, sliding_window="every_layer",
                                 export_defaults={"sliding_window": None}, default_export=False),
    "Qwen2ForCausalLM": Family("qwen2", dict(_SWIGLU, qkv_bias=True), sliding_window="opt_in",
                               export_defaults=_NO_SLIDING),
    "Qwen3ForCausalLM": Family("qwen3", dict(_SWIGLU, qk_norm="head"), head_dim_default=128,
                               sliding_window="per_layer", export_fixed={"attention_bias": False, **_NO_SLIDING}),
    "Olmo2ForCausalLM": Family("olmo2", dict(_SWIGLU, qk_norm="projection", norm_position="post"),
                               eps_default=1e-5, export_fixed={"attention_bias": False}),
    "NemotronForCausalLM": Family(
        "nemotron", dict(mlp="squared_relu", norm="layernorm1p", norm_position="pre", qk_norm="none", qkv_bias=False),
        hidden_act="relu2", eps_key="norm_eps", eps_default=1e-5, partial_rotary_default=0.5, max_len_default=4096,
        export_fixed=_NO_BIASES),
}
_ACTIVATION_NAMES = {"relu2": "squared ReLU", "silu": "SwiGLU"}
# rope_type -> {config.json rope scaling key: (ModelConfig field, type)}, in transformers' order.
_ROPE_FIELDS: dict[str, dict[str, tuple[str, type]]] = {
    "default": {},
    "linear": {"factor": ("rope_factor", float)},
    "llama3": {"factor": ("rope_factor", float), "low_freq_factor": ("rope_low_freq_factor", float),
               "high_freq_factor": ("rope_high_freq_factor", float),
               "original_max_position_embeddings": ("rope_original_max_seq_len", int)},
}
# Keys that configure mixture-of-experts layers in transformers' configs (Mixtral, Qwen MoE, OLMoE, DeepSeek).
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "num_experts_per_tok")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One Hugging Face tensor and where it lives in the cpt_jax parameter pytree.

    cpt_jax keeps weights as [in, out...] (einsum operands) while torch Linear weights are [out, in]:
    `transpose` says the Hugging Face tensor is transposed before the reshape.
    """

    hf_name: str
    path: tuple[str, ...]  # keys into the params dict
    layer: int | None  # index into the stacked 'layers' axis, None for top-level parameters
    hf_shape: tuple[int, ...]
    transpose: bool

    def leaf(self, params: dict[str, Any]) -> Any:
        """The parameter of `params` this tensor is (or is one layer's slice of)."""
        return params[self.path[0]] if len(self.path) == 1 else params[self.path[0]][self.path[1]]

    def to_cpt(self, w: np.ndarray, cpt_shape: tuple[int, ...]) -> np.ndarray:
        """The Hugging Face tensor `w` in the cpt_jax layout (one layer's slice of a stacked parameter)."""
        return (w.T if self.transpose else w).reshape(cpt_shape)

    def to_hf(self, p: np.ndarray) -> np.ndarray:
        """The cpt_jax parameter (one layer's slice) in the Hugging Face layout (a view where possible)."""
        return p.reshape(self.hf_shape[::-1]).T if self.transpose else p.reshape(self.hf_shape)


def tensor_specs(c: model.ModelConfig) -> list[TensorSpec]:
    """Every Hugging Face tensor of a model of config `c`, in transformers' order.

    The names follow from the options alone: with norms after the sublayers (OLMo 2) the block's
    norms are post_attention_layernorm and post_feedforward_layernorm; LayerNorms have a bias;
    Nemotron's MLP has no gate; the 1 + w scale of layernorm1p is stored as w on both sides.
    """
    D, N, K, H, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.hd, c.d_ff, c.vocab_size
    post = c.norm_position == "post"
    norms = (("post_attention_layernorm", "attn_norm"), ("post_feedforward_layernorm", "mlp_norm")) if post else (
        ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm"))
    biased = c.norm != "rmsnorm"
    qkv = (("q", N * H), ("k", K * H), ("v", K * H))
    qk_norm_sizes = (("q", H), ("k", H)) if c.qk_norm == "head" else qkv[:2]
    specs = [TensorSpec("model.embed_tokens.weight", ("embed",), None, (V, D), False)]
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        layer = [(f"{p}self_attn.{x}_proj.weight", f"w{x}", (rows, D), True) for x, rows in qkv]
        if c.qkv_bias:
            layer += [(f"{p}self_attn.{x}_proj.bias", f"b{x}", (rows,), False) for x, rows in qkv]
        layer.append((p + "self_attn.o_proj.weight", "wo", (D, N * H), True))
        if c.qk_norm != "none":
            layer += [(f"{p}self_attn.{x}_norm.weight", f"{x}_norm_scale", (size,), False) for x, size in qk_norm_sizes]
        if c.mlp == "swiglu":
            layer.append((p + "mlp.gate_proj.weight", "w_gate", (F, D), True))
        layer += [
            (p + "mlp.up_proj.weight", "w_up", (F, D), True),
            (p + "mlp.down_proj.weight", "w_down", (D, F), True),
        ]
        for hf_norm, ours in norms:
            layer.append((f"{p}{hf_norm}.weight", f"{ours}_scale", (D,), False))
            if biased:
                layer.append((f"{p}{hf_norm}.bias", f"{ours}_bias", (D,), False))
        specs += [TensorSpec(name, ("layers", key), i, shape, t) for name, key, shape, t in layer]
    specs.append(TensorSpec("model.norm.weight", ("final_norm_scale",), None, (D,), False))
    if biased:
        specs.append(TensorSpec("model.norm.bias", ("final_norm_bias",), None, (D,), False))
    if not c.tie_embeddings:
        specs.append(TensorSpec("lm_head.weight", ("lm_head",), None, (V, D), True))
    return specs


def ignorable(name: str, c: model.ModelConfig) -> bool:
    """Tensors a checkpoint may carry that cpt_jax recomputes or shares."""
    # Old checkpoints saved RoPE's inverse frequencies as a buffer (recomputed from the config);
    # a tied model may still carry a copy of the embedding as lm_head.
    return name.endswith(".rotary_emb.inv_freq") or (c.tie_embeddings and name == "lm_head.weight")


def architecture_of(hf_config: dict[str, Any], where: str) -> str:
    """The supported architecture class a config.json names, or a ConfigError naming what it found."""
    names = hf_config.get("architectures") or []
    supported = ", ".join(FAMILIES)
    if not isinstance(names, list) or not names:
        by_type = {f.model_type: a for a, f in FAMILIES.items()}
        if hf_config.get("model_type") in by_type:
            return by_type[hf_config["model_type"]]
        raise ConfigError(f"{where}: no architectures and model_type {hf_config.get('model_type')!r}, "
                          f"expected one of {supported}")
    if len(names) != 1 or names[0] not in FAMILIES:
        found = ", ".join(map(str, names))
        moe = any("moe" in str(n).lower() or "mixtral" in str(n).lower() for n in names)
        what = " (mixture-of-experts layers, which cpt_jax does not implement)" if moe else ""
        raise ConfigError(f"{where}: architecture {found} is not supported{what}, expected one of {supported}")
    return names[0]


def _positive_int(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} is {value!r}, expected a positive integer")
    return value


def _rope_settings(cfg: dict[str, Any], where: str, partial_default: float | None) -> dict[str, Any]:
    """ModelConfig rope fields from transformers 4.x (rope_theta + rope_scaling, partial_rotary_factor
    at the top level) or 5.x (rope_parameters). `partial_default` is the family's default fraction,
    None for families that rotate whole heads."""
    theta = cfg.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        if all(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{where}: rope_parameters per layer type ({', '.join(params)}), expected one set of "
                              "rope parameters for every layer")
        theta = params.get("rope_theta", theta)
        scaling = params
    if theta is None:
        theta = 10000.0  # transformers' default for these architectures
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{where}: rope_theta is {theta!r}, expected a positive number")
    scaling = scaling or {}
    if not isinstance(scaling, dict):
        raise ConfigError(f"{where}: rope_scaling is {scaling!r}, expected a JSON object or null")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    partial = scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
    if partial_default is None:
        if partial not in (None, 1, 1.0):
            raise ConfigError(f"{where}: partial_rotary_factor {partial}, expected 1.0 (RoPE on the whole head)")
        partial = 1.0
    elif partial is None:
        partial = partial_default
    if isinstance(partial, bool) or not isinstance(partial, (int, float)) or not 0 < partial <= 1:
        raise ConfigError(f"{where}: partial_rotary_factor {partial!r}, expected a fraction in (0, 1]")
    if not isinstance(kind, str) or kind not in _ROPE_FIELDS:
        raise ConfigError(f"{where}: rope type {kind!r} is not supported, expected 'default', 'linear' or "
                          "'llama3'")
    try:
        fields = {ours: cast(scaling[key]) for key, (ours, cast) in _ROPE_FIELDS[kind].items()}
    except KeyError as e:
        raise ConfigError(f"{where}: rope scaling {kind!r} without {e.args[0]}, expected the field") from None
    return {"rope_theta": float(theta), "partial_rotary_factor": float(partial),
            "rope_scaling": "none" if kind == "default" else kind, **fields}


def _sliding_layers(c: dict[str, Any], n_layers: int) -> list[int]:
    """Layers a Qwen3 config.json makes sliding-window ones (transformers: layer_types, or from
    use_sliding_window, sliding_window and max_window_layers as 4.x configs say it)."""
    types = c.get("layer_types")
    if isinstance(types, list) and types:
        return [i for i, t in enumerate(types) if t != "full_attention"]
    if c.get("use_sliding_window") and c.get("sliding_window"):
        first = c.get("max_window_layers", 28)  # transformers' Qwen3Config default
        return [i for i in range(n_layers) if i >= first]
    return []


def _check_family_options(c: dict[str, Any], family: Family, where: str) -> None:
    """ConfigError for what the family's config.json may ask that cpt_jax does not compute."""
    for key in _MOE_KEYS:
        value = c.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            raise ConfigError(f"{where}: {key} {value} asks for mixture-of-experts layers, which cpt_jax does not "
                              f"implement, expected a dense {family.model_type} model")
    act, want = c.get("hidden_act", family.hidden_act), family.hidden_act
    if act != want:
        raise ConfigError(f"{where}: hidden_act {act!r}, expected {want!r} ({_ACTIVATION_NAMES[want]})")
    # A family with a qkv bias (Qwen2) reads attention_bias as that bias.
    if c.get("attention_bias") and not family.options["qkv_bias"]:
        raise ConfigError(f"{where}: attention_bias true puts a bias on o_proj too, which cpt_jax's decoder does "
                          "not have, expected attention_bias false")
    if c.get("mlp_bias"):
        raise ConfigError(f"{where}: mlp_bias true, expected false (cpt_jax's MLP has no biases)")


def model_config_from_hf(hf_config: dict[str, Any], architecture: str, where: str) -> model.ModelConfig:
    """The cpt_jax ModelConfig equivalent to a config.json of a supported architecture."""
    c = hf_config
    family = FAMILIES[architecture]
    if c.get("model_type", family.model_type) != family.model_type:
        raise ConfigError(f"{where}: model_type {c.get('model_type')!r} with architecture {architecture}, "
                          f"expected {family.model_type!r}")
    _check_family_options(c, family, where)
    L = _positive_int(c, "num_hidden_layers", where)
    D = _positive_int(c, "hidden_size", where)
    N = _positive_int(c, "num_attention_heads", where)
    K = _positive_int(c, "num_key_value_heads", where, default=N)
    H = _positive_int({"head_dim": c.get("head_dim") or family.head_dim_default or D // N}, "head_dim", where)
    if N % K:
        raise ConfigError(f"{where}: num_attention_heads {N} is not a multiple of num_key_value_heads {K}, "
                          "expected a multiple")
    rope = _rope_settings(c, where, family.partial_rotary_default)
    rotary = int(H * rope["partial_rotary_factor"])
    if rotary < 2 or rotary % 2:
        raise ConfigError(f"{where}: head_dim {H} with partial_rotary_factor {rope['partial_rotary_factor']} rotates "
                          f"{rotary} dimensions, expected an even number for RoPE")
    max_len = _positive_int(c, "max_position_embeddings", where, default=family.max_len_default)
    if family.sliding_window == "per_layer":
        sliding = _sliding_layers(c, L)
        if sliding:
            raise ConfigError(f"{where}: sliding-window attention on layers {sliding[0]}..{sliding[-1]} "
                              f"(sliding_window {c.get('sliding_window')}), which cpt_jax does not implement, "
                              "expected full attention on every layer (use_sliding_window false)")
    # A sliding window changes nothing while sequences are no longer than it: capping max_seq_len
    # there keeps training exact with cpt_jax's full causal attention (Mistral, Qwen2: every layer).
    if c.get("sliding_window") and (family.sliding_window == "every_layer" or (
            family.sliding_window == "opt_in" and c.get("use_sliding_window"))):
        max_len = min(max_len, _positive_int(c, "sliding_window", where))
    return model.ModelConfig(
        n_layers=L,
        d_model=D,
        n_heads=N,
        n_kv_heads=K,
        head_dim=0 if H * N == D else H,
        d_ff=_positive_int(c, "intermediate_size", where),
        vocab_size=_positive_int(c, "vocab_size", where),
        max_seq_len=max_len,
        norm_eps=float(c.get(family.eps_key, family.eps_default)),
        tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        **dict(family.options, **rope),
    )


def architecture_for(c: model.ModelConfig, source_architecture: str | None, where: str) -> str:
    """The Hugging Face class a model exports as: the first family whose options it has (the
    architecture it was imported from when that one fits). ConfigError naming the option that
    differs from the closest family when none fits."""
    def mismatches(arch: str) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in FAMILIES[arch].options.items() if getattr(c, k) != v]

    fits = [a for a, f in FAMILIES.items() if not mismatches(a) and f.default_export]
    if source_architecture in FAMILIES and not mismatches(source_architecture):
        return source_architecture
    if fits:
        return fits[0]
    closest = min(FAMILIES, key=lambda a: len(mismatches(a)))
    key, want = mismatches(closest)[0]
    raise ConfigError(f"{where}: model.{key} is {getattr(c, key)!r}, which no Hugging Face architecture cpt_jax "
                      f"exports has with the rest of this model (closest: {closest}, with {key} {want!r}); "
                      f"exportable: {', '.join(FAMILIES)}")


def _rope_to_hf(c: model.ModelConfig) -> dict[str, Any] | None:
    if c.rope_scaling == "none":
        return None
    fields = _ROPE_FIELDS[c.rope_scaling]
    return {"rope_type": c.rope_scaling, **{key: getattr(c, ours) for key, (ours, _) in fields.items()}}


def hf_config_for(c: model.ModelConfig, architecture: str, dtype: str, base: dict[str, Any] | None,
                  tokenizer: Tokenizer | None) -> dict[str, Any]:
    """config.json for `c` as `architecture`. `base` (the imported model's own config.json, same
    architecture) keeps what cpt_jax does not model: token ids, sliding window, the context length."""
    out = dict(base or {})
    # Written in the 4.x form (rope_theta, rope_scaling, torch_dtype, a top-level
    # partial_rotary_factor), which 5.x reads too.
    for key in ("rope_parameters", "rope_scaling", "rope_theta", "transformers_version", "dtype", "torch_dtype",
                "partial_rotary_factor", "rms_norm_eps", "norm_eps"):
        out.pop(key, None)
    family = FAMILIES[architecture]
    max_len = out.get("max_position_embeddings")
    if not isinstance(max_len, int) or max_len < c.max_seq_len:
        max_len = c.max_seq_len
    out.update(
        architectures=[architecture],
        model_type=family.model_type,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.hd,
        vocab_size=c.vocab_size,
        max_position_embeddings=max_len,
        rope_theta=c.rope_theta,
        rope_scaling=_rope_to_hf(c),
        tie_word_embeddings=c.tie_embeddings,
        hidden_act=family.hidden_act,
        torch_dtype=dtype,
        dtype=dtype,
        **family.export_fixed,
    )
    out[family.eps_key] = c.norm_eps
    if family.partial_rotary_default is not None:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    for key, value in dict(family.export_defaults, initializer_range=c.init_std, attention_dropout=0.0,
                           use_cache=True).items():
        out.setdefault(key, value)
    if family.sliding_window in ("opt_in", "per_layer"):
        out.setdefault("max_window_layers", c.n_layers)
        # per_layer: sliding-window layers were refused at import, so every layer is a full one.
        if family.sliding_window == "per_layer" or len(out.get("layer_types") or []) != c.n_layers:
            out.pop("layer_types", None)
    for which in ("bos", "eos", "pad"):
        if out.get(f"{which}_token_id") is None and tokenizer is not None:
            token_id = getattr(tokenizer, f"{which}_id")
            if which != "pad" or token_id != tokenizer.eos_id:  # the eos stand-in is no pad token
                out[f"{which}_token_id"] = token_id
        # Explicit nulls: the families' own defaults (OLMo 2's eos 50279, Nemotron's 2 and 3) belong
        # to their tokenizers, not to this model's.
        out.setdefault(f"{which}_token_id", None)
    return dict(sorted(out.items()))
