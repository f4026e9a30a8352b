"""Shared set-up: the `rho` binary, a small corpus, a tokenizer and tiny models, and helpers
that start real `rho loader` / `rho selector` processes."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "python"))

SECRET = "python-conformance-secret-0123456789"
RUN_ID = "py"


def rho_bin() -> str:
    exe = os.environ.get("RHO_BIN") or str(ROOT / "target" / "release" / "rho")
    if not Path(exe).exists():
        pytest.fail(f"no rho binary at {exe}: build it (cargo build --release) or set RHO_BIN")
    return exe


def rho(*args: str) -> None:
    out = subprocess.run([rho_bin(), *args], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"rho {args}: {out.stderr}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pipeline:
    """Processes of one test; every one is stopped at the end."""

    def __init__(self, root: Path):
        self.root = root
        self.procs = []
        self.env = dict(os.environ, RHO_SECRET=SECRET, RUST_LOG="warn")

    def write(self, name: str, value: dict) -> Path:
        path = self.root / name
        path.write_text(json.dumps(value))
        return path

    def start(self, kind: str, config: Path) -> subprocess.Popen:
        log = open(self.root / f"{config.stem}.log", "w")
        command = [rho_bin(), kind, "--config", str(config)]
        p = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=self.env)
        self.procs.append(p)
        return p

    def loader(self, name: str = "loader", **overrides) -> str:
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        cfg = {
            "run_id": RUN_ID, "data": {"paths": [str(self.root / "data")]},
            "tokenizer": str(self.root / "tokenizer.json"), "seq_len": 32, "batch_size": 4,
            "endpoint": endpoint, "max_in_flight": 8, "shuffle_window": 4,
        }
        cfg.update(overrides)
        self.start("loader", self.write(f"{name}.json", cfg))
        return endpoint

    def selector(self, loader: str, delivery: str, name: str = "selector") -> subprocess.Popen:
        cfg = {
            "run_id": RUN_ID, "loader": loader, "trainer": delivery, "model": str(self.root / "ref"),
            "tokenizer": str(self.root / "tokenizer.json"),
            "liveness": {"heartbeat_secs": 0.2, "peer_timeout_secs": 2.0},
        }
        return self.start("selector", self.write(f"{name}.json", cfg))

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("assets")
    rho("synth", "--shards", "1", "--docs-per-shard", "60", "--seed", "5", "--out", str(root / "data"))
    tokenizer = str(root / "tokenizer.json")
    rho("tokenizer", "train", "--vocab-size", "300", "--input", str(root / "data"), "--out", tokenizer)
    rho("model", "init", "--preset", "tiny", "--seed", "1", "--tokenizer", tokenizer, "--out", str(root / "ref"))
    return root


@pytest.fixture
def pipeline(assets, tmp_path):
    for name in ("data", "tokenizer.json", "ref"):
        (tmp_path / name).symlink_to(assets / name)
    p = Pipeline(tmp_path)
    yield p
    p.stop()


def wait_until(cond, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
