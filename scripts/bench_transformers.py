#!/usr/bin/env python3
"""HF transformers (PyTorch, CPU) on the same SmolLM2 GGUF, dequantized to f32: generation speed,
and forward+backward through PEFT LoRA (rank 16 on every projection, as `ttrl-serve bench`), with
the process's peak memory: the peer `ttrl-serve bench` is compared with. Run by
scripts/bench-runtime.sh in a bench-only venv.

    python bench_transformers.py GGUF_PATH --batch 1,8,32 --new-tokens 64 --threads 2 --train 16x128
"""
import argparse
import os
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train", default="16x128", help="sequences x tokens of the forward+backward run")
    ap.add_argument("--lora-rank", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(args.gguf), gguf_file=os.path.basename(args.gguf),
                                                 torch_dtype=torch.float32).eval()
    vocab = model.config.vocab_size
    print("| transformers measurement | value |")
    print("|---|---|")
    for b in [int(x) for x in args.batch.split(",")]:
        ids = torch.tensor([[(i * 7919 + s * 104729 + 13) % min(vocab, 30000) for i in range(args.prompt_tokens)]
                            for s in range(b)])
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.7, min_new_tokens=2)
            t = time.time()
            out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                 do_sample=True, temperature=0.7, pad_token_id=0)
            secs = time.time() - t
        n = (out.shape[1] - ids.shape[1]) * b
        print(f"| generate batch {b} | {n / secs:.1f} tok/s |", flush=True)
    train(model, vocab, args)


def train(model, vocab, args):
    """Next-token cross-entropy forward+backward through LoRA on q,k,v,o,gate,up,down."""
    from peft import LoraConfig, get_peft_model

    seqs, tokens = (int(x) for x in args.train.split("x"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                  target_modules=targets, lora_dropout=0.0))
    peft_model.train()
    ids = torch.tensor([[(i * 7919 + s * 104729 + 13) % min(vocab, 30000) for i in range(tokens)]
                        for s in range(seqs)])
    t = time.time()
    loss = peft_model(input_ids=ids, labels=ids).loss
    forward = time.time() - t
    loss.backward()
    total = time.time() - t
    with_grad = sum(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(f"| forward+backward {seqs}x{tokens} tokens, PEFT LoRA r={args.lora_rank} | {total:.2f} s "
          f"(forward {forward:.2f} s; {with_grad} LoRA tensors with gradients) |")
    print(f"| peak resident memory | {peak_gb:.2f} GB |", flush=True)


if __name__ == "__main__":
    main()
