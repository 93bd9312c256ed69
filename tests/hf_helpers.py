"""Random tiny Hugging Face models of every supported family, written by transformers, and their
cpt_jax imports (the `zoo` fixture of conftest.py builds each on first use, once per session)."""

import os
import shutil

import torch
import transformers

from cpt_jax import hf_import

VOCAB = 320  # room for the test tokenizers (byte-level BPE of 300, sentencepiece of 320)
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              rms_norm_eps=1e-6)
FAMILIES = {
    # GQA, untied, Llama-3 rope scaling whose three frequency bands all occur at head_dim 16,
    # fp32 weights in a sharded index.
    "llama": dict(
        cls="LlamaForCausalLM", dtype="float32", shard="40KB", tokenizer="hf",
        config=dict(COMMON, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=256,
                    rope_theta=10000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                          high_freq_factor=4.0, original_max_position_embeddings=64)),
    ),
    # A sliding window shorter than the context: max_seq_len is capped at it.
    "mistral": dict(
        cls="MistralForCausalLM", dtype="float32", shard=None, tokenizer="sp",
        config=dict(COMMON, num_key_value_heads=1, tie_word_embeddings=False, max_position_embeddings=256,
                    sliding_window=48, rope_theta=1e6),
    ),
    # qkv bias, tied embeddings, bf16 weights.
    "qwen2": dict(
        cls="Qwen2ForCausalLM", dtype="bfloat16", shard=None, tokenizer="hf",
        config=dict(COMMON, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128,
                    rope_theta=1e6),
    ),
    # RMSNorm on each head of q and k, GQA, tied embeddings, bf16 weights in a sharded index.
    "qwen3": dict(
        cls="Qwen3ForCausalLM", dtype="bfloat16", shard="40KB", tokenizer="hf",
        config=dict(COMMON, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, max_position_embeddings=128,
                    rope_theta=1e6),
    ),
    # Untied, one kv head, fp32 in one file.
    "qwen3_untied": dict(
        cls="Qwen3ForCausalLM", dtype="float32", shard=None, tokenizer="sp",
        config=dict(COMMON, num_key_value_heads=1, head_dim=16, tie_word_embeddings=False,
                    max_position_embeddings=128, rope_theta=1e6),
    ),
    # RMSNorm over the whole q and k projections (with GQA: the key norm spans both kv heads), norms
    # after the sublayers, fp32 in a sharded index.
    "olmo2": dict(
        cls="Olmo2ForCausalLM", dtype="float32", shard="40KB", tokenizer="hf",
        config=dict(COMMON, num_key_value_heads=2, tie_word_embeddings=False, max_position_embeddings=128,
                    rope_theta=5e5),
    ),
    # LayerNorm with a 1 + w scale, squared ReLU, RoPE on half of each head of width 24 (head_dim is
    # not hidden / heads), GQA, untied, bf16 weights.
    "nemotron": dict(
        cls="NemotronForCausalLM", dtype="bfloat16", shard=None, tokenizer="sp",
        config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=24, norm_eps=1e-5,
                    partial_rotary_factor=0.5, tie_word_embeddings=False, max_position_embeddings=128,
                    rope_theta=1e4),
    ),
}
LR_MIN = {"llama": 3e-5, "mistral": 2.5e-5, "qwen2": 1e-5, "qwen3": 2e-5, "qwen3_untied": 2e-5, "olmo2": 3e-5,
          "nemotron": 4.5e-5}
def make_hf_model(directory, family, sp_path=None, seed=0):
    """Write a random tiny model of `family` with save_pretrained, plus its tokenizer files."""
    from data_helpers import make_hf_tokenizer

    spec = FAMILIES[family]
    config_cls = getattr(transformers, spec["cls"].replace("ForCausalLM", "Config"))
    torch.manual_seed(seed)
    m = getattr(transformers, spec["cls"])(config_cls(**spec["config"]))
    with torch.no_grad():
        # Far from transformers' init (unit norms, zero biases) so that every tensor's mapping shows
        # in the logits, and large enough that the logits are O(1).
        for name, p in m.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    m = m.to(getattr(torch, spec["dtype"]))
    kwargs = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    # transformers 5 draws a progress bar on stderr while writing shards; the tests that check our
    # own stderr (one-line errors) must not see it.
    transformers.utils.logging.disable_progress_bar()
    m.save_pretrained(directory, safe_serialization=True, **kwargs)
    if spec["tokenizer"] == "hf":
        make_hf_tokenizer(directory, vocab_size=300, config={"eos_token": "<|endoftext|>"})
    else:
        shutil.copyfile(sp_path, os.path.join(directory, "tokenizer.model"))
    return str(directory)


class Zoo:
    """HF model directories and their imports, each built on first use."""

    def __init__(self, root, sp_path):
        self.root, self.sp_path = root, sp_path
        self._hf, self._ckpt = {}, {}

    def hf(self, family):
        if family not in self._hf:
            self._hf[family] = make_hf_model(os.path.join(self.root, f"hf-{family}"), family, self.sp_path)
        return self._hf[family]

    def ckpt(self, family):
        if family not in self._ckpt:
            out = os.path.join(self.root, f"ckpt-{family}")
            hf_import.import_hf(self.hf(family), out, lr_min=LR_MIN[family])
            self._ckpt[family] = out
        return self._ckpt[family]


def safetensors_of(directory):
    """{name: torch tensor} of every safetensors file of a model directory."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out
