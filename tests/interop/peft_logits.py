"""Logits of a base model with a PEFT LoRA adapter, as HF transformers and peft compute them.

Usage: python peft_logits.py MODEL_DIR ADAPTER_DIR IDS_JSON
Prints {"lora": rows, "base": rows}: one row of logits per input position, with the adapter
and with it disabled.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model_dir, adapter_dir, ids = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
inputs = torch.tensor([ids])
with torch.no_grad():
    lora = model(inputs).logits[0]
    with model.disable_adapter():
        plain = model(inputs).logits[0]
print(json.dumps({"lora": lora.tolist(), "base": plain.tolist()}))
