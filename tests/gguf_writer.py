"""Writing GGUF files in tests the way llama.cpp's convert_hf_to_gguf.py does, with the
gguf package's own writer and quantizers: the independent side of the GGUF tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np

gguf = __import__("pytest").importorskip("gguf")
T = gguf.GGMLQuantizationType

# Byte offsets of the float16 scale fields inside one 256-weight K-quant super-block
# (ggml-common.h block_q*_K), and the block sizes: random bytes with small scales there
# are valid blocks whose decoded weights have a sane magnitude.
K_SCALE_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
                  T.Q5_0: (0,), T.Q5_1: (0, 2), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}

LLAMA_LAYER = {  # HF name -> GGUF name, as in llama.cpp's tensor map
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: rotate-half row order -> Meta's adjacent pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of llama_cpp_permute."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows: int, cols: int, rng, scale: float = 2e-4) -> np.ndarray:
    """(rows, bytes per row) uint8 of random K-quant super-blocks with small f16 scales."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for offset in K_SCALE_FIELDS[qtype]:
        d = (rng.uniform(0.5, 1.5, size=len(blocks)) * scale).astype(np.float16)
        blocks[:, offset:offset + 2] = d.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def encode(w: np.ndarray, qtype) -> tuple[np.ndarray, object]:
    """A float matrix in GGUF type qtype: (array for GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == T.F32:
        return w.astype(np.float32), None
    if qtype == T.F16:
        return w.astype(np.float16), None
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def add_sentencepiece_vocab(w, vocab_dir: Path) -> None:
    """tokenizer.model in ``vocab_dir`` as a "llama" GGUF vocabulary, ids 0/1/2 = unk/bos/eos."""
    tokens, scores, types = zip(*gguf.vocab.SentencePieceVocab(vocab_dir).all_tokens())
    w.add_tokenizer_model("llama")
    w.add_token_list(list(tokens))
    w.add_token_scores(list(scores))
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


def write_llama_gguf(path: Path, model, vocab_dir: Path, matrix_type=T.F32, edge_type=None,
                     raw: dict | None = None, extra_tensors: dict | None = None, metadata=None) -> Path:
    """Write a transformers LlamaForCausalLM as a GGUF file. Matrices in ``matrix_type``,
    token embedding and output head in ``edge_type`` (default: the same), norms in F32.
    ``raw``: GGUF name -> (uint8 blocks, qtype) written instead of the model's weight.
    ``extra_tensors``: GGUF name -> float32 array added as is. ``metadata(writer)`` may add keys."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}
    w.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)

    add_sentencepiece_vocab(w, vocab_dir)
    w.add_add_bos_token(True)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    if metadata:
        metadata(w)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    tensors = [("token_embd.weight", sd["model.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        for hf, g in LLAMA_LAYER.items():
            x = sd[f"model.layers.{i}.{hf}"]
            if g == "attn_q.weight":
                x = llama_cpp_permute(x, cfg.num_attention_heads)
            elif g == "attn_k.weight":
                x = llama_cpp_permute(x, cfg.num_key_value_heads)
            tensors.append((f"blk.{i}.{g}", x))
    tensors.append(("output_norm.weight", sd["model.norm.weight"]))
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", sd["lm_head.weight"]))
    for name, x in tensors:
        if raw and name in raw:
            blocks, qtype = raw[name]
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
            continue
        edge = name in ("token_embd.weight", "output.weight")
        qtype = T.F32 if x.ndim == 1 else (edge_type or matrix_type) if edge else matrix_type
        data, raw_dtype = encode(x, qtype)
        w.add_tensor(name, data, raw_shape=data.shape if raw_dtype is not None else None, raw_dtype=raw_dtype)
    for name, x in (extra_tensors or {}).items():
        w.add_tensor(name, np.asarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- byte-level BPE vocabularies and the Falcon / MPT layouts ------------------------------------

def bpe_vocab_arrays(tokenizer_json: Path) -> tuple[list, list, list]:
    """(tokens, token types, merges) as convert_hf_to_gguf.py writes a tokenizer.json's
    vocabulary: added tokens are control (special) or user-defined, gaps become [PADn]."""
    import json

    j = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    vocab = dict(j["model"]["vocab"])
    added = {t["id"]: t for t in j["added_tokens"]}
    vocab.update({t["content"]: i for i, t in added.items()})
    by_id = {i: s for s, i in vocab.items()}
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(by_id[i])
            kind = (gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED) if i in added \
                else gguf.TokenType.NORMAL
            types.append(int(kind))
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return tokens, types, merges


def _write(path: Path, arch: str, metadata, tensors: list, tokenizer_json: Path, pre: str, matrix_type, edge_type):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-random-{arch}")
    metadata(w)
    tokens, types, merges = bpe_vocab_arrays(tokenizer_json)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id({"falcon": 11, "gptj": 50256}.get(arch, 0))
    for name, x in tensors:
        edge = name in ("token_embd.weight", "output.weight")
        qtype = T.F32 if x.ndim == 1 else (edge_type or matrix_type) if edge else matrix_type
        data, raw_dtype = encode(x, qtype)
        w.add_tensor(name, data, raw_shape=data.shape if raw_dtype is not None else None, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_falcon_gguf(path: Path, model, tokenizer_json: Path, matrix_type=T.F32, edge_type=None) -> Path:
    """convert_hf_to_gguf.py FalconModel: fused QKV regrouped to all q | all k | all v."""
    cfg = model.config
    H, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    Hkv = cfg.num_kv_heads if cfg.new_decoder_architecture else 1

    def metadata(w):
        w.add_context_length(2048)  # llama.cpp writes 2048: config.json has no such key
        w.add_tensor_data_layout("jploski")
        w.add_embedding_length(cfg.hidden_size)
        w.add_feed_forward_length(4 * cfg.hidden_size)
        w.add_block_count(cfg.num_hidden_layers)
        w.add_head_count(H)
        w.add_head_count_kv(Hkv)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        if theta != 10000.0:
            w.add_rope_freq_base(theta)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"input_layernorm": "attn_norm", "ln_attn": "attn_norm", "ln_mlp": "attn_norm_2",
             "self_attention.dense": "attn_output", "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
    tensors = [("token_embd.weight", sd["transformer.word_embeddings.weight"])]
    for i in range(cfg.num_hidden_layers):
        p = f"transformer.h.{i}."
        qkv = sd[p + "self_attention.query_key_value.weight"].reshape(Hkv, H // Hkv + 2, hd, -1)
        regrouped = np.concatenate([qkv[:, :-2].reshape(H * hd, -1), qkv[:, -2].reshape(Hkv * hd, -1),
                                    qkv[:, -1].reshape(Hkv * hd, -1)])
        layer = [(f"blk.{i}.attn_qkv.weight", regrouped)]
        for hf, g in names.items():
            for kind in ("weight", "bias"):
                if p + f"{hf}.{kind}" in sd:
                    layer.append((f"blk.{i}.{g}.{kind}", sd[p + f"{hf}.{kind}"]))
        tensors += layer
    tensors += [("output_norm.weight", sd["transformer.ln_f.weight"]),
                ("output_norm.bias", sd["transformer.ln_f.bias"])]
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", sd["lm_head.weight"]))
    return _write(path, "falcon", metadata, tensors, tokenizer_json, "falcon", matrix_type, edge_type)


def write_mpt_gguf(path: Path, model, tokenizer_json: Path, matrix_type=T.F32, edge_type=None) -> Path:
    """convert_hf_to_gguf.py MPTModel: tensors renamed, Wqkv kept fused (q | k | v)."""
    cfg = model.config
    attn = cfg.attn_config if isinstance(cfg.attn_config, dict) else cfg.attn_config.to_dict()

    def metadata(w):
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(4 * cfg.d_model)
        w.add_head_count(cfg.n_heads)
        w.add_layer_norm_eps(1e-5)
        if attn.get("clip_qkv") is not None:
            w.add_clamp_kqv(attn["clip_qkv"])
        w.add_max_alibi_bias(attn.get("alibi_bias_max", 8))

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"norm_1": "attn_norm", "attn.Wqkv": "attn_qkv", "attn.out_proj": "attn_output", "norm_2": "ffn_norm",
             "ffn.up_proj": "ffn_up", "ffn.down_proj": "ffn_down"}
    tensors = [("token_embd.weight", sd["transformer.wte.weight"])]
    for i in range(cfg.n_layers):
        tensors += [(f"blk.{i}.{g}.weight", sd[f"transformer.blocks.{i}.{hf}.weight"]) for hf, g in names.items()]
    tensors.append(("output_norm.weight", sd["transformer.norm_f.weight"]))
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", sd["lm_head.weight"]))
    return _write(path, "mpt", metadata, tensors, tokenizer_json, "mpt", matrix_type, edge_type)


def write_gptj_gguf(path: Path, model, tokenizer_json: Path, matrix_type=T.F32, edge_type=None) -> Path:
    """convert_hf_to_gguf.py GPTJModel: the tensors renamed, biases kept, nothing permuted."""
    cfg = model.config

    def metadata(w):
        w.add_block_count(cfg.n_layer)
        w.add_context_length(cfg.n_positions)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(4 * cfg.n_embd)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        if cfg.rotary_dim < cfg.n_embd // cfg.n_head:
            w.add_rope_dimension_count(cfg.rotary_dim)

    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {"ln_1": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
             "attn.out_proj": "attn_output", "mlp.fc_in": "ffn_up", "mlp.fc_out": "ffn_down"}
    tensors = [("token_embd.weight", sd["transformer.wte.weight"])]
    for i in range(cfg.n_layer):
        for hf, g in names.items():
            for kind in ("weight", "bias"):
                if f"transformer.h.{i}.{hf}.{kind}" in sd:
                    tensors.append((f"blk.{i}.{g}.{kind}", sd[f"transformer.h.{i}.{hf}.{kind}"]))
    tensors += [("output_norm.weight", sd["transformer.ln_f.weight"]),
                ("output_norm.bias", sd["transformer.ln_f.bias"])]
    if not cfg.tie_word_embeddings:
        tensors.append(("output.weight", sd["lm_head.weight"]))
    tensors.append(("output.bias", sd["lm_head.bias"]))
    return _write(path, "gptj", metadata, tensors, tokenizer_json, "gpt-2", matrix_type, edge_type)
