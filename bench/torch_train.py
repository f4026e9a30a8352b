"""PyTorch reference for `rho bench trainer`: training steps of the same checkpoint in
`transformers` (forward, per-token loss, top-k excess-loss mask or every token, backward, AdamW),
on batches of the same shape, on the same cores.

    python bench/torch_train.py --model runs/bench-trainer/model-20m --seq-len 512 --batch-size 4 --threads 2

Prints seconds per step and tokens/s for causal LM and for SLM (k = 0.6), measured in
alternating rounds as rho measures them.
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    vocab, b, t = model.config.vocab_size, args.batch_size, args.seq_len
    ref = (torch.arange(b * t) * 37 % 97).float().reshape(b, t) / 10.0

    def batch(seq):
        return ((torch.arange(b * (t + 1)) * 7919 + seq * 104729) % vocab).reshape(b, t + 1)

    def step(seq, ratio):
        ids = batch(seq)
        logits = model(input_ids=ids[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1), reduction="none").reshape(b, t)
        if ratio < 1.0:
            excess = (loss.detach() - ref).reshape(-1)
            k = int(ratio * excess.numel() + 0.5)
            mask = torch.zeros_like(excess)
            mask[torch.topk(excess, k).indices] = 1.0
            objective = (loss.reshape(-1) * mask).sum() / k
        else:
            objective = loss.mean()
        opt.zero_grad(set_to_none=True)
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    step(0, 0.6)
    times = {1.0: 0.0, 0.6: 0.0}
    seq = 1
    for _ in range(4):
        for ratio in (1.0, 0.6):
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(seq, ratio)
                seq += 1
            times[ratio] += time.perf_counter() - t0
    n = 4 * args.steps
    for ratio, name in ((1.0, "causal LM"), (0.6, "SLM k=0.6")):
        print(f"torch {torch.__version__}, {args.threads} threads, {name}: {times[ratio] / n:.3f} s/step, {b * t * n / times[ratio]:.0f} tokens/s")


if __name__ == "__main__":
    main()
