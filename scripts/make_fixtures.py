#!/usr/bin/env python3
"""Builds the tiny random checkpoints and the reference logits the parity tests compare to.

For each family (llama, qwen2, qwen3) this writes tests/fixtures/tiny-<family>/ with
config.json, model.safetensors, tokenizer.json, tokenizer_config.json (ChatML), a GGUF of the
same weights (q/k rows permuted for llama as llama.cpp's converter does), and
expected.safetensors holding input ids and HF transformers' logits for them.

Run it with torch, transformers, tokenizers and gguf installed (CPU is enough):
    python3 scripts/make_fixtures.py
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
import gguf

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_tokenizer():
    """A byte-level BPE with 256 byte tokens, a few merges and ChatML specials."""
    byte_vocab = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in sorted(byte_vocab):
        vocab[ch] = len(vocab)
    merges = []
    for a, b in [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("a", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]:
        merges.append((a, b))
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    return tok, vocab, merges


def configs(vocab_size):
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                  max_position_embeddings=128, bos_token_id=0, eos_token_id=2)
    return {
        "llama": LlamaConfig(**common, rope_theta=10000.0, tie_word_embeddings=True),
        "qwen2": Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=False),
        "qwen3": Qwen3Config(**common, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True),
    }


def randomize(model):
    """Default init leaves norms at 1 and biases at 0; random values make parity meaningful."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def rope_theta(cfg):
    # transformers 5 keeps it in rope_parameters; 4.x as a top-level field.
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))


def permute_for_gguf(w, n_head):
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    parts = hf.split(".")
    layer, module, kind = parts[2], ".".join(parts[3:-1]), parts[-1]
    return f"blk.{layer}.{LAYER_NAMES[module]}.{kind}"


def write_gguf(path, family, cfg, state, vocab, merges):
    w = gguf.GGUFWriter(path, family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(rope_theta(cfg))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None):
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_chat_template(CHATML)
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t = t.detach().float()
        if family == "llama" and name.endswith("q_proj.weight"):
            t = permute_for_gguf(t, cfg.num_attention_heads)
        if family == "llama" and name.endswith("k_proj.weight"):
            t = permute_for_gguf(t, cfg.num_key_value_heads)
        w.add_tensor(gguf_name(name), t.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    torch.manual_seed(0)
    tok, vocab, merges = make_tokenizer()
    for family, cfg in configs(len(vocab)).items():
        out = os.path.join(ROOT, f"tiny-{family}")
        os.makedirs(out, exist_ok=True)
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32).eval()
        randomize(model)
        model.save_pretrained(out, safe_serialization=True)
        tok.save(os.path.join(out, "tokenizer.json"))
        with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": CHATML}, f, indent=1)
        for extra in ["generation_config.json"]:
            p = os.path.join(out, extra)
            if os.path.exists(p):
                os.remove(p)
        state = model.state_dict()
        write_gguf(os.path.join(out, "model.gguf"), family, cfg, state, vocab, merges)
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, len(vocab), (2, 24), generator=g)
        with torch.no_grad():
            logits = model(ids).logits
        save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
                  os.path.join(out, "expected.safetensors"))
        print(family, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main()
