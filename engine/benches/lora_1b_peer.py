"""The PyTorch + PEFT column for engine/benches/lora_1b.rs: the same
Llama-3.2-1B shape, random init, batch 1 x 512, LoRA r 16 / alpha 32 on all
seven projections (PEFT's "all-linear"), base frozen, AdamW on the adapter,
f32, same threads: median step time of 3 after a warm-up, peak RSS.

    python engine/benches/lora_1b_peer.py [THREADS]

Needs torch, transformers and peft in a venv (not a dependency of herd)."""
import json, resource, sys, time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
torch.manual_seed(0)
config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                     max_position_embeddings=2048, tie_word_embeddings=True)
start = time.perf_counter()
model = LlamaForCausalLM(config)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
init_s = time.perf_counter() - start
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, config.vocab_size, (1, 512))


def step():
    logits = model(ids).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


times = []
for i in range(4):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
median = sorted(times[1:])[1]
print(json.dumps({"threads": torch.get_num_threads(), "init_s": round(init_s, 1),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "s_per_step": round(median, 2), "tokens_per_s": round(512 / median),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
