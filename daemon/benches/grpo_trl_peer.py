"""TRL's GRPOTrainer on what `grpo_bench --keep DIR` leaves in DIR: the same
model, the same eight 128-token prompts, the same hyperparameters (8 prompts
x a group of 8, 128 new tokens, temperature 1, top-p 1, beta 0, one
iteration, the `dapo` loss, micro-batches of 16 with 4 accumulation steps,
so one optimizer step per GRPO step), the same regex reward, on the CPU with
transformers' generation (no vLLM). Prints the median step time and
generation share over the steps after the first, as one JSON line.

    python grpo_trl_peer.py DIR THREADS [STEPS]

Reference material for the benchmark only: not run by the tests.
"""
import json
import re
import sys
import time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

root, threads = sys.argv[1], int(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 4
torch.set_num_threads(threads)
torch.manual_seed(0)

model = AutoModelForCausalLM.from_pretrained(f"{root}/model", torch_dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(f"{root}/model")
rows = [json.loads(l) for l in open(f"{root}/prompts.jsonl")]
data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows])


def reward(completions, **_):
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [1.0 if re.search("a", t) else 0.0 for t in texts]


args = GRPOConfig(
    output_dir=f"{root}/trl-out",
    per_device_train_batch_size=16,
    gradient_accumulation_steps=4,
    num_generations=8,
    max_completion_length=128,
    temperature=1.0,
    top_p=1.0,
    beta=0.0,
    num_iterations=1,
    loss_type="dapo",
    learning_rate=1e-6,
    max_steps=steps,
    logging_steps=1,
    save_strategy="no",
    report_to=[],
    use_cpu=True,
    bf16=False,
    seed=0,
    dataloader_num_workers=0,
)
trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)

# Generation time: every call of the model's generate.
generating = [0.0]
inner = trainer.model.generate


def timed_generate(*a, **k):
    t = time.perf_counter()
    out = inner(*a, **k)
    generating[0] += time.perf_counter() - t
    return out


trainer.model.generate = timed_generate


class Steps(TrainerCallback):
    def __init__(self):
        self.times, self.shares, self.lengths = [], [], []

    def on_step_begin(self, *_, **__):
        self.t = time.perf_counter()
        generating[0] = 0.0

    def on_step_end(self, *_, **__):
        dt = time.perf_counter() - self.t
        self.times.append(dt)
        self.shares.append(generating[0] / dt)

    def on_log(self, _args, _state, _control, logs=None, **__):
        if logs and "completions/mean_length" in logs:
            self.lengths.append(logs["completions/mean_length"])


cb = Steps()
trainer.add_callback(cb)
trainer.train()
median = lambda xs: sorted(xs)[len(xs) // 2]
print(json.dumps({
    "step_s": median(cb.times[1:]),
    "generation_share": median(cb.shares[1:]),
    "completion_mean": median(cb.lengths[1:]) if len(cb.lengths) > 1 else None,
    "threads": threads,
    "trl": __import__("trl").__version__,
    "torch": torch.__version__,
}))
