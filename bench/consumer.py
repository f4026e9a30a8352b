"""Batches per second that a trainer-side consumer sustains: the Python `rho_stream` consumer
against the Rust `rho trainer` with its null backend, fed the same way.

A feeder process plays the selectors: it connects to the consumer's delivery endpoint, says
hello, and answers every credit with the next pre-encoded, signed `scored` batch (rows x
seq_len tokens with their reference losses), as fast as credits allow. A real `rho loader`
takes the acknowledgements. Each consumer receives `--batches` batches; the rate is measured
from the fifth of them onwards.

    python bench/consumer.py --rho target/release/rho --rows 8 --seq-len 2048 --batches 400
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
from rho_stream import Key, RhoStream  # noqa: E402
from rho_stream.protocol import control, decode, encode  # noqa: E402

SECRET = b"bench-consumer-secret-0123456789"
RUN = "bench-consumer"


def port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def feeder(endpoint: str, batches: int, rows: int, seq_len: int) -> None:
    key = Key(SECRET)
    w = seq_len + 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 32000, size=(rows, w), dtype=np.uint32).astype("<u4").tobytes()
    ref = rng.random((rows, w - 1), dtype=np.float32).astype("<f4").tobytes()
    msgs = []
    for seq in range(batches):
        header = {
            "kind": "scored", "run_id": RUN, "seq": seq, "epoch": 0, "tokenizer": "sha256:" + "0" * 64,
            "lengths": [w] * rows, "doc_starts": [[0]] * rows, "ref_model": "sha256:" + "1" * 64,
            "tensors": [
                {"name": "tokens", "dtype": "u32", "shape": [rows, w]},
                {"name": "ref_loss", "dtype": "f32", "shape": [rows, w - 1]},
            ],
        }
        msgs.append(encode(header, [tokens, ref], key))
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    s.send_multipart(control("heartbeat", RUN, key, role="selector", at_ms=0))
    credits, sent = 0, 0
    while sent < batches:
        if credits == 0 or s.poll(0):
            frames = s.recv_multipart()
            m = decode(frames, key=key)
            if m.kind == "credit":
                credits += m.header["n"]
            continue
        s.send_multipart(msgs[sent], copy=False)
        sent += 1
        credits -= 1
    time.sleep(5)  # let the last messages drain before the socket goes
    s.close(0)


def steady_rate(times: list[float]) -> float:
    i = len(times) // 5
    return (len(times) - 1 - i) / (times[-1] - times[i])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rho", default="target/release/rho")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batches", type=int, default=400)
    args = ap.parse_args()
    rho = str(Path(args.rho).resolve())
    env = dict(os.environ, RHO_SECRET=SECRET.decode(), RUST_LOG="warn")
    tmp = Path(tempfile.mkdtemp(prefix="bench-consumer-"))
    subprocess.run([rho, "synth", "--shards", "1", "--docs-per-shard", "20", "--out", str(tmp / "data")], check=True, capture_output=True)
    subprocess.run([rho, "tokenizer", "train", "--vocab-size", "300", "--input", str(tmp / "data"), "--out", str(tmp / "tokenizer.json")], check=True, capture_output=True)
    loader_ep = f"tcp://127.0.0.1:{port()}"
    (tmp / "loader.json").write_text(json.dumps({
        "run_id": RUN, "data": {"paths": [str(tmp / "data")]}, "tokenizer": str(tmp / "tokenizer.json"),
        "seq_len": 16, "batch_size": 1, "endpoint": loader_ep, "exit_when_done": False,
    }))
    loader = subprocess.Popen([rho, "loader", "--config", str(tmp / "loader.json")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = {}
    try:
        # Rust: rho trainer, null backend.
        delivery = f"tcp://127.0.0.1:{port()}"
        metrics = tmp / "trainer.metrics.jsonl"
        (tmp / "trainer.json").write_text(json.dumps({
            "run_id": RUN, "loader": loader_ep, "delivery": delivery, "backend": "null",
            "selection": {"score": "excess"}, "max_steps": args.batches, "metrics": str(metrics),
        }))
        trainer = subprocess.Popen([rho, "trainer", "--config", str(tmp / "trainer.json")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        feed = mp.Process(target=feeder, args=(delivery, args.batches, args.rows, args.seq_len))
        feed.start()
        trainer.wait(timeout=600)
        times = [json.loads(l)["elapsed_s"] for l in metrics.read_text().splitlines()]
        results["rust null-backend trainer"] = steady_rate(times)
        feed.terminate()

        # Python: rho_stream.
        delivery = f"tcp://127.0.0.1:{port()}"
        stream = RhoStream(loader_ep, RUN, delivery=delivery, secret=SECRET)
        feed = mp.Process(target=feeder, args=(delivery, args.batches, args.rows, args.seq_len))
        feed.start()
        times = []
        checksum = 0
        for b in stream:
            checksum += int(b.tokens[0, 0]) + int(b.ref_loss.shape[1])
            times.append(time.monotonic())
            if len(times) >= args.batches:
                break
        stream.close()
        feed.terminate()
        results["python rho_stream"] = steady_rate(times)
    finally:
        loader.kill()
    mb = args.rows * (2 * args.seq_len + 1) * 4 / 1e6
    print(f"batches of {args.rows} x {args.seq_len} tokens with reference losses ({mb:.2f} MB each), signed; {args.batches} batches")
    print("| consumer | batches/s | MB/s |\n|---|---|---|")
    for name, rate in results.items():
        print(f"| {name} | {rate:.0f} | {rate * mb:.0f} |")


if __name__ == "__main__":
    main()
