"""The PyTorch column of BENCHMARKS.md: the same shape (llama-bench.json), the
same thread count, the steps a transformers/TRL user would run.

    python engine/benches/torch_peer.py engine/benches/llama-bench.json [THREADS]

Needs torch and transformers (a venv: pip install torch transformers). Prints
one JSON line: SFT tokens/s (forward, backward, AdamW), DPO pair-tokens/s
(policy forward+backward on chosen and rejected, reference forward without
grad each step, as TRL does without precomputed reference log-probs) and
greedy generation new tokens/s (batch 4, 32-token prompts, 128 new tokens),
and rejection sampling's generation new tokens/s (generate with
num_return_sequences=10 on each of two 128-token prompts, 128 new tokens,
temperature 0.8, top-p 0.95).
Median of 5 timed repetitions after one warm-up, as the Rust bench does."""
import json, sys, time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

shape = json.load(open(sys.argv[1]))
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 2)
batch, seq = shape.pop("bench_batch"), shape.pop("bench_seq")
config = LlamaConfig(**shape)
torch.manual_seed(0)
policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config).eval()
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
tokens = torch.randint(0, config.vocab_size, (batch, seq))


def median_rate(step, work, reps=5):
    step()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return work / sorted(times)[reps // 2]


def sft():
    logits = policy(tokens).logits[:, :-1]
    F.cross_entropy(logits.reshape(-1, config.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    optimizer.step()
    optimizer.zero_grad()


def sequence_logps(model, rows):
    logp = model(rows).logits[:, :-1].log_softmax(-1)
    return logp.gather(2, rows[:, 1:, None]).sum((1, 2))


def dpo():
    rows = torch.cat([tokens, tokens.flip(0)])  # chosen, then rejected
    with torch.no_grad():
        ref = sequence_logps(reference, rows)
    pol = sequence_logps(policy, rows)
    margin = (pol[:batch] - ref[:batch]) - (pol[batch:] - ref[batch:])
    (-F.logsigmoid(0.1 * margin).mean()).backward()
    optimizer.step()
    optimizer.zero_grad()


prompts = tokens[:4, :32]


def generate():
    with torch.no_grad():
        reference.generate(prompts, max_new_tokens=128, min_new_tokens=128, do_sample=False, pad_token_id=0)


sample_prompts = torch.randint(0, config.vocab_size, (2, 128))


def sample():
    with torch.no_grad():
        for p in sample_prompts:
            reference.generate(p[None], do_sample=True, temperature=0.8, top_p=0.95, num_return_sequences=10,
                               max_new_tokens=128, min_new_tokens=128, pad_token_id=0)


only = sys.argv[3].split(",") if len(sys.argv) > 3 else None
if only == ["sample"]:
    print(json.dumps({"threads": torch.get_num_threads(),
                      "sample_new_tokens_per_s": round(median_rate(sample, 2 * 10 * 128, reps=3))}))
    sys.exit(0)
print(json.dumps({
    "threads": torch.get_num_threads(),
    "sft_tokens_per_s": round(median_rate(sft, batch * seq)),
    "dpo_pair_tokens_per_s": round(median_rate(dpo, 2 * batch * seq)),
    "generate_new_tokens_per_s": round(median_rate(generate, 4 * 128, reps=3)),
    "sample_new_tokens_per_s": round(median_rate(sample, 2 * 10 * 128, reps=3)),
}))
