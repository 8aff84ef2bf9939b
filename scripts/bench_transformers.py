#!/usr/bin/env python3
"""HF transformers (PyTorch, CPU) generation speed on the same SmolLM2 GGUF, dequantized to f32:
the peer `ttrl-serve bench` is compared with. Run by scripts/bench-runtime.sh in a bench-only venv.

    python bench_transformers.py GGUF_PATH --batch 1,8,32 --new-tokens 64 --threads 2
"""
import argparse
import os
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


if __name__ == "__main__":
    main()
