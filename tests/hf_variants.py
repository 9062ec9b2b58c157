"""Oracles for checkpoint options transformers' MptForCausalLM does not run itself, built
from the transformers model it does run.

* Grouped-query MPT (MosaicML's attn_type grouped_query_attention, e.g. Replit Code v1.5):
  a multi-head transformers model whose query heads in each group of n_heads/kv_n_heads
  share one key head and one value head computes exactly grouped-query attention; its
  checkpoint is rewritten with only those shared heads, as MosaicML stores it.
* alibi_bias_max: transformers builds its ALiBi tensor without it (always 8); MosaicML's
  model passes it on. The oracle passes it to transformers' own builder.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .hf_oracle import save_random_model

# MptConfig keys that change the forward pass (transformers' strict MptConfig rejects
# some real checkpoint values of the others, e.g. attn_pdrop=0.0)
MPT_FORWARD_KEYS = ("d_model", "n_heads", "n_layers", "vocab_size", "max_seq_len", "layer_norm_epsilon",
                    "tie_word_embeddings")
MPT_ATTN_FORWARD_KEYS = ("clip_qkv", "softmax_scale")


def mpt_gqa_checkpoint(config: dict, directory: Path, tokenizer_files: list[Path]):
    """Save a random grouped-query MPT checkpoint whose config.json is ``config`` (attn_type
    grouped_query_attention with kv_n_heads); return (oracle transformers model, directory)."""
    import torch
    import transformers
    from safetensors.numpy import load_file, save_file

    attn = config["attn_config"]
    H, Hkv = config["n_heads"], attn["kv_n_heads"]
    hd, group = config["d_model"] // H, H // Hkv
    mha = transformers.MptConfig(**{k: config[k] for k in MPT_FORWARD_KEYS if k in config},
                                 attn_config={k: attn[k] for k in MPT_ATTN_FORWARD_KEYS if k in attn})
    model = transformers.MptForCausalLM(mha).eval()
    save_random_model(model, directory, tokenizer_files)

    D = config["d_model"]
    with torch.no_grad():
        for block in model.transformer.blocks:
            w = block.attn.Wqkv.weight                                   # (3D, D): q | k | v
            for start in (D, 2 * D):                                     # k, then v
                heads = w[start:start + D].view(Hkv, group, hd, D)
                heads[:] = heads[:, :1].clone()                          # each group shares its first head
    tensors = load_file(directory / "model.safetensors")
    for i, block in enumerate(model.transformer.blocks):
        w = block.attn.Wqkv.weight.detach().numpy()
        k = w[D:2 * D].reshape(Hkv, group, hd, D)[:, 0].reshape(-1, D)
        v = w[2 * D:].reshape(Hkv, group, hd, D)[:, 0].reshape(-1, D)
        tensors[f"transformer.blocks.{i}.attn.Wqkv.weight"] = np.concatenate([w[:D], k, v])
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return model, directory


def mpt_with_alibi_bias_max(model, alibi_bias_max: float):
    """Make a transformers MPT model build its ALiBi bias with ``alibi_bias_max``, as MosaicML's does."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    def build(num_heads, sequence_length, alibi_bias_max_ignored=8, device=None):
        return build_mpt_alibi_tensor(num_heads, sequence_length, alibi_bias_max, device)

    model.transformer.build_mpt_alibi_tensor = build
    return model
