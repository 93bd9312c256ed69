"""Model presets: architectures of known sizes and of the open models users continue.

`preset_config(name)` is the full default config with `model` set to the preset; config files in
configs/ start from it.
"""

from __future__ import annotations

import ml_collections

from cpt_jax.config import default_config

MODELS: dict[str, dict] = {
    # About 1M parameters: trains on a CPU in seconds.
    "tiny": dict(n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=512, max_seq_len=256),
    "125m": dict(n_layers=12, d_model=768, n_heads=12, n_kv_heads=12, d_ff=2048, vocab_size=32000, max_seq_len=2048),
    "1b": dict(n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, d_ff=8192, vocab_size=32000, max_seq_len=4096),
    "llama2_7b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=32000, max_seq_len=4096
    ),
    "llama3_8b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256, max_seq_len=8192,
        rope_theta=500000.0,
    ),
    "mistral_7b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=32000, max_seq_len=32768,
        rope_theta=1000000.0,
    ),
    "qwen2_7b": dict(
        n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, d_ff=18944, vocab_size=152064, max_seq_len=32768,
        rope_theta=1000000.0, qkv_bias=True, norm_eps=1e-6,
    ),
    # Qwen3-8B's config.json (Qwen/Qwen3-8B on the Hugging Face hub): head_dim 128, RMSNorm on each
    # head of q and k, no qkv bias, untied.
    "qwen3_8b": dict(
        n_layers=36, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=12288, vocab_size=151936,
        max_seq_len=40960, rope_theta=1000000.0, norm_eps=1e-6, qk_norm="head",
    ),
    # OLMo-2-1124-7B's config.json (allenai/OLMo-2-1124-7B): RMSNorm over the whole q and k
    # projections, norms after the attention and MLP instead of before, untied.
    "olmo2_7b": dict(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=100352, max_seq_len=4096,
        rope_theta=500000.0, norm_eps=1e-6, qk_norm="projection", norm_position="post",
    ),
    # The model of "Reuse, Don't Retrain", of the shape the Nemotron-4 15B technical report gives
    # (arXiv 2402.16819, Sec. 2 and Table 1; docs/recipe.md). MLP width 24576, init std 0.0134, RoPE
    # on half of each head, LayerNorm with a zero-centred (1 + w) scale: NVIDIA's Megatron-Bridge
    # Nemotron4ModelProvider15B (ffn_hidden_size, init_method_std, rotary_percent 0.5, normalization
    # LayerNorm with layernorm_zero_centered_gamma). Eps 1e-5 and RoPE base 10000: the Nemotron
    # family's published Hugging Face configs (the Minitron-8B/4B models pruned from it: norm_eps
    # 1e-05, rope_theta 10000, partial_rotary_factor 0.5, head_dim 128).
    "nemotron4_15b": dict(
        n_layers=32, d_model=6144, n_heads=48, n_kv_heads=8, d_ff=24576, vocab_size=256000, max_seq_len=4096,
        mlp="squared_relu", norm="layernorm1p", norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5,
        tie_embeddings=False, init_std=0.0134,
    ),
}


def preset_config(name: str) -> ml_collections.ConfigDict:
    """The default config with the model preset `name` (one of MODELS)."""
    if name not in MODELS:
        raise KeyError(f"model preset {name!r}; known presets: {', '.join(MODELS)}")
    cfg = default_config()
    cfg.model.update(MODELS[name])
    cfg.train.seq_len = min(cfg.model.max_seq_len, 4096)
    return cfg


def apply_recipe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The recipe's run settings on a config whose model is set: cosine from the init_from
    checkpoint's lr_min to 1/100 of it, a General Blend of placeholder sources, then the QA Blend
    once the LR reaches start/5. Point the sources at your prepared data."""
    c.train.steps = 10000
    c.train.batch_size = 512
    c.train.log_every_steps = 10
    c.schedule.name = "recipe"  # start_lr None: the init_from checkpoint's lr_min
    c.schedule.final_ratio = 0.01
    c.checkpoint.every_steps = 500
    c.data.kind = "mixture"
    c.data.sources.pretraining_like = "/path/to/prepared/pretraining_like"
    c.data.sources.new_domain = "/path/to/prepared/new_domain"
    c.data.sources.qa = "/path/to/prepared/qa"
    c.data.phases = (
        dict(weights={"pretraining_like": 0.7, "new_domain": 0.3, "qa": 0.0}),
        dict(weights={"pretraining_like": 0.55, "new_domain": 0.35, "qa": 0.10}, start_at=dict(lr_ratio=0.2)),
    )
    return c
