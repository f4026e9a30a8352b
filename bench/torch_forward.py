"""PyTorch reference for `rho bench selector`: the forward pass and per-token loss of the same
checkpoint in `transformers`, on batches of the same shape, on the same cores.

    python bench/torch_forward.py --model runs/bench-selector/ref-20m --seq-len 512 --batch-size 4 --threads 2

Prints tokens/s (target positions scored per second), measured as rho measures its bare
forward: one warm-up batch, then N timed batches. With `--profile`, also prints where PyTorch's
time goes over five more batches (`torch.profiler`, ops by their own CPU time).
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
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler's table of ops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa").eval()
    vocab = model.config.vocab_size
    window = args.seq_len + 1
    ids = (torch.arange(args.batch_size * window) * 7919 % vocab).reshape(args.batch_size, window)

    def score():
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :-1]).logits.float()
            logp = torch.log_softmax(logits, dim=-1)
            return -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)

    score()
    t0 = time.perf_counter()
    for _ in range(args.batches):
        score()
    secs = time.perf_counter() - t0
    tokens = args.batch_size * args.seq_len * args.batches
    print(f"torch {torch.__version__}, {args.threads} threads: {tokens / secs:.0f} tokens/s")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                score()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
