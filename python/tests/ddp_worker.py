"""One rank of a data-parallel training loop on a rho stream, started by torchrun from
test_ranks.py: a tiny model under DistributedDataParallel (gloo, CPU), one all-reduce per step,
so that a rank with fewer batches than another would leave the other waiting forever.

Arguments: the loader endpoints file (one endpoint per line, by rank), the run id, the output
directory (each rank writes rank-N.json: its step count and sequence numbers)."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_ddp import TinyDdp  # noqa: E402

from rho_stream import RhoStream  # noqa: E402


def main() -> None:
    endpoints, run_id, out = Path(sys.argv[1]).read_text().split(), sys.argv[2], Path(sys.argv[3])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo")
    model = TinyDdp(int(sys.argv[4]))
    seqs = []
    with RhoStream(endpoints[rank], run_id, scored=False, rank=rank, world=world,
                   secret=os.environ["RHO_SECRET"].encode(), as_torch=True) as stream:
        for batch in stream:
            model.step(batch.tokens)
            seqs.append(batch.seq)
        total = stream.total
    (out / f"rank-{rank}.json").write_text(json.dumps({"steps": len(seqs), "seqs": seqs, "total": total}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
