"""The PyTorch + PEFT column for engine/benches/lora_1b.rs (and, with
`smollm`, for engine/benches/lora_smollm.rs: SmolLM-135M's shape, batch
8 x 256): the same Llama-3.2-1B shape, random init, batch 1 x 512, LoRA r 16 / alpha 32 on all
seven projections (PEFT's "all-linear"), base frozen, AdamW on the adapter,
same threads: median step time of 3 after a warm-up, peak RSS of the steps
(VmHWM reset after init) and of the whole process.

    python engine/benches/lora_1b_peer.py [THREADS] [f32|bf16] [ckpt] [smollm]

bf16: the model in bf16 with the adapter in f32 (PEFT's autocast_adapter_dtype);
ckpt: transformers' gradient checkpointing (non-reentrant).
Needs torch, transformers and peft in a venv (not a dependency of herd)."""
import json, sys, time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def vm(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


args = sys.argv[1:]
threads = int(args[0]) if args and args[0].isdigit() else 2
bf16, ckpt = "bf16" in args, "ckpt" in args
torch.set_num_threads(threads)
torch.manual_seed(0)
if "smollm" in args:
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    batch, seq = 8, 256
else:
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    batch, seq = 1, 512
start = time.perf_counter()
model = LlamaForCausalLM(config)
if bf16:
    model = model.to(torch.bfloat16)
if ckpt:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
model.train()
init_s = time.perf_counter() - start
init_peak = vm("VmHWM")
open("/proc/self/clear_refs", "w").write("5")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, config.vocab_size, (batch, seq))


def step():
    logits = model(ids).logits[:, :-1].float()
    F.cross_entropy(logits.reshape(-1, config.vocab_size), ids[:, 1:].reshape(-1)).backward()
    opt.step()
    opt.zero_grad()


times = []
for i in range(4):
    t = time.perf_counter()
    step()
    times.append(time.perf_counter() - t)
median = sorted(times[1:])[1]
steps_peak = vm("VmHWM")
print(json.dumps({"threads": torch.get_num_threads(), "dtype": "bf16" if bf16 else "f32", "ckpt": ckpt,
                  "init_s": round(init_s, 1),
                  "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "s_per_step": round(median, 2), "tokens_per_s": round(batch * seq / median),
                  "peak_rss_mib_steps": round(steps_peak), "peak_rss_mib_process": round(max(init_peak, steps_peak))}))
