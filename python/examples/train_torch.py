"""Train a HuggingFace `transformers` causal LM with Selective Language Modeling on a rho stream.

rho's loader and selectors do the data work (tokenize, pack, order, score with the reference);
this loop only trains. One process:

    rho loader --config loader.json            # endpoint tcp://127.0.0.1:5555
    python python/examples/train_torch.py --loader tcp://127.0.0.1:5555 --run-id my-run \\
        --model path/to/hf-checkpoint --delivery tcp://127.0.0.1:5556 --out ckpt/
    rho selector --config selector.json        # trainer: tcp://127.0.0.1:5556

Data parallel with torchrun under `rho run` (docs/SCALING.md): one loader and one pool of
selectors serve every rank; the run config's `trainer_command` starts this script once through
torchrun, and each rank finds its stream in the environment (`--loader` and `--run-id` left out):

    "trainer_command": {"command": ["torchrun", "--nproc-per-node", "2",
        "python/examples/train_torch.py", "--model", "...", "--out", "..."], "ranks": 2}

By hand, with one pipeline per rank (each loader configured with `rank` and `world`, rank r gets
sequence numbers r, r + world, ...); `{rank}` in an endpoint is replaced by the process's rank:

    torchrun --nproc-per-node 2 python/examples/train_torch.py \\
        --loader 'tcp://127.0.0.1:555{rank}' --delivery 'tcp://127.0.0.1:556{rank}' ...

A checkpoint (`state.pt`, written by rank 0: under DDP every rank holds the same model and
optimizer state) holds the model, the optimizer, the step and rank 0's stream cursor. `--resume`
continues from it on any number of ranks: every rank loads it, and the stream continues at the
global cursor, split among the ranks there are now (docs/SCALING.md, "Resuming on another
number of ranks").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rho_stream import RhoStream, random_key, slm_loss  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loader", help="loader endpoint ({rank} is replaced); default: from the environment rho run sets")
    ap.add_argument("--delivery", default="tcp://127.0.0.1:0", help="endpoint for the selectors ({rank} is replaced)")
    ap.add_argument("--delivery-file", help="write the bound delivery endpoint here ({rank} is replaced)")
    ap.add_argument("--run-id", help="the run id; default: from the environment rho run sets")
    ap.add_argument("--model", required=True, help="HuggingFace checkpoint directory")
    ap.add_argument("--secret-file", help="the run's secret (default: RHO_SECRET, else unsigned)")
    ap.add_argument("--score", choices=["excess", "reference", "current", "random", "none"], default="excess")
    ap.add_argument("--selection-seed", type=int, default=0, help="seed of the `random` score rule")
    ap.add_argument("--ratio", type=float, default=0.6)
    ap.add_argument(
        "--scope",
        choices=["batch", "sequence", "global"],
        default="batch",
        help="select over each rank's batch, each sequence, or (global) the union of every rank's batch of a step",
    )
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: at the end of the stream)")
    ap.add_argument("--out", required=True, help="checkpoint directory")
    ap.add_argument("--every", type=int, default=100, help="checkpoint every this many steps")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if args.device == "cuda" else args.device)

    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    scored = args.score in ("excess", "reference")
    if args.loader is None:
        # Under `rho run`: endpoints, run id, secret and progress file from the environment.
        stream = RhoStream.from_env(scored=scored, as_torch=True, pin_memory=device.type == "cuda")
    else:
        if args.run_id is None:
            ap.error("--run-id is needed with --loader")
        stream = RhoStream(
            args.loader.format(rank=rank),
            args.run_id,
            scored=scored,
            delivery=args.delivery.format(rank=rank),
            secret_file=args.secret_file,
            rank=rank,
            world=world,
            as_torch=True,
            pin_memory=device.type == "cuda",
        )
    if stream.delivery_endpoint:
        print(f"rank {rank}: selectors deliver to {stream.delivery_endpoint}", flush=True)
        if args.delivery_file:
            Path(args.delivery_file.format(rank=rank)).write_text(stream.delivery_endpoint)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    step = 0
    ckpt = out / "state.pt"
    if args.resume and ckpt.exists():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        stream.load_state_dict(state["stream"])
        step = state["step"]
        print(f"rank {rank}: resumed at step {step}, stream cursor {state['stream']['next_seq']}", flush=True)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    def save() -> None:
        # The ranks are at the same step; rank 0's state is every rank's, its cursor names the
        # global cursor. Written whole, then renamed.
        if rank == 0:
            state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": step}
            state["stream"] = stream.state_dict()
            torch.save(state, out / "state.pt.tmp")
            os.replace(out / "state.pt.tmp", ckpt)
            model.save_pretrained(out / "model")
        if world > 1:
            dist.barrier()

    started = time.time()
    for batch in stream:
        tokens = batch.tokens.to(device, non_blocking=True)
        valid = torch.from_numpy(batch.valid()).to(device)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        logits = ddp(input_ids=inputs).logits
        if args.score == "none":
            ref = torch.zeros_like(labels, dtype=torch.float32)
            loss = slm_loss(logits, labels, ref, 1.0, args.scope, valid, rule="none")
        else:
            if args.score in ("excess", "reference"):
                ref = batch.ref_loss.to(device, non_blocking=True)
            else:  # `current` and `random` need no reference losses
                ref = torch.zeros_like(labels, dtype=torch.float32)
            key = random_key(args.selection_seed, step)
            loss = slm_loss(logits, labels, ref, args.ratio, args.scope, valid, rule=args.score, key=key)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if rank == 0 and (step % 10 == 0 or step == 1):
            print(f"step {step} seq {batch.seq} loss {loss.item():.4f} ({time.time() - started:.1f} s)", flush=True)
        if step % args.every == 0:
            save()
        if args.steps and step >= args.steps:
            break
    save()
    stream.close()
    print(f"rank {rank}: {step} steps, stream {stream.stats}", flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
