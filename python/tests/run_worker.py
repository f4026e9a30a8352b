"""One rank of a data-parallel training loop started by `rho run` through its `trainer_command`
(torchrun, gloo, CPU): the stream comes from the environment `rho run` sets
(``RhoStream.from_env``). A tiny model under DistributedDataParallel takes one all-reduce per
step, so a rank with fewer batches than another would leave it waiting forever.

Arguments: the output directory (each rank writes rank-N.json: its sequence numbers and a digest
of each batch's tokens) and the vocabulary size. With STOP_AFTER, every rank stops after that many
steps and rank 0 writes its stream cursor to state.json (as a DDP checkpoint holds rank 0's
state); with RESUME, every rank continues from the cursor in that file, whatever the number of
ranks that wrote it."""

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_ddp import TinyDdp  # noqa: E402

from rho_stream import RhoStream  # noqa: E402


def digest(tokens) -> str:
    return hashlib.sha256(tokens.to(torch.int64).numpy().tobytes()).hexdigest()


def main() -> None:
    out, vocab = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    assert int(os.environ["RHO_RANKS"]) == dist.get_world_size()
    model = TinyDdp(vocab)
    seqs, digests, scored = [], [], 0
    stop_after = int(os.environ.get("STOP_AFTER", "0"))
    with RhoStream.from_env(as_torch=True) as stream:
        if os.environ.get("RESUME"):
            stream.load_state_dict(json.loads(Path(os.environ["RESUME"]).read_text()))
        for batch in stream:
            model.step(batch.tokens)
            # A training step that takes time (the test kills a selector mid-run).
            time.sleep(float(os.environ.get("STEP_SECS", "0")))
            seqs.append(batch.seq)
            digests.append(digest(batch.tokens))
            scored += batch.ref_loss is not None
            if len(seqs) == stop_after:
                if rank == 0:
                    (out / "state.json").write_text(json.dumps(stream.state_dict()))
                break
    result = {"seqs": seqs, "digests": digests, "scored": scored, "stats": vars(stream.stats)}
    (out / f"rank-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
