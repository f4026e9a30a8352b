"""A trainer's end of a rho pipeline: scored batches in sequence order, for any training loop.

:class:`RhoStream` plays the part of ``rho trainer`` in the protocol (docs/PROTOCOL.md): it binds
the delivery endpoint that selectors send scored batches to (or, for plain causal LM, asks the
loader for token batches directly), grants credits, answers heartbeats, reorders by sequence
number, drops duplicates, checks every message's run id and signature, acknowledges each batch
to the loader once the next one is asked for, and reconnects to a loader that falls silent,
telling it where to resume. A background thread does all of it, so heartbeats go on while the
training loop computes.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import zmq

from .protocol import Key, Limits, Message, ProtocolError, advertised, check_secret, control, decode

log = logging.getLogger("rho_stream")


@dataclass
class Batch:
    """One batch of the stream. ``tokens[b]`` holds inputs ``[:-1]`` and targets ``[1:]``; target
    position ``t`` is valid when ``t + 1 < lengths[b]``; ``ref_loss`` (scored streams) holds the
    reference loss of every target position (0 where not valid)."""

    seq: int
    epoch: int
    tokenizer: str
    lengths: np.ndarray
    doc_starts: List[List[int]]
    tokens: Any
    ref_loss: Any = None
    ref_model: Optional[str] = None
    # What shapes the stream (docs/PROTOCOL.md, "Stream identity"), when the loader said.
    stream: Optional[Dict[str, Any]] = None
    # The (rank, world) its loader issued it for, in a run of several ranks; None otherwise.
    rank: Optional[Tuple[int, int]] = None

    @property
    def rows(self) -> int:
        return int(self.lengths.shape[0])

    @property
    def window(self) -> int:
        return int(self.tokens.shape[1])

    def valid(self) -> np.ndarray:
        """``[rows, window - 1]`` bool: the target positions that count."""
        t = np.arange(self.window - 1)[None, :]
        return (t + 1) < self.lengths[:, None]


@dataclass
class Stats:
    batches: int = 0
    duplicates: int = 0
    messages_rejected: int = 0
    reconnects: int = 0
    selectors_seen: int = 0
    # Scored batches refused: another reference model, or reference losses that are not finite.
    reference_refused: int = 0


_END = object()


class RhoStream:
    """Iterate over a rho pipeline's batches as its trainer.

    ``loader``: the loader's endpoint (acknowledgements, heartbeats and resumes go there; token
    batches come from there when ``scored`` is false). ``delivery``: the endpoint to bind for
    selectors (port 0 picks one; see :attr:`delivery_endpoint`). ``secret`` / ``secret_file``:
    the run's shared secret (default: ``RHO_SECRET``, else unsigned). ``rank`` / ``world``:
    consume the sequence numbers ``rank, rank + world, ...`` (data parallelism), from a loader
    of that rank or one loader of every rank (whose credits then name the rank). ``as_torch``: yield torch tensors
    (``pin_memory`` for faster host-to-device copies). ``metrics``: append a JSON line of this
    rank's progress there (``elapsed_s``, ``rank``, ``batches``, ``seq``,
    ``data_wait_fraction``) at most once a second and at :meth:`close`.
    ``advertise``: the host selectors on other hosts reach this rank at (default: the bound
    host, or for a wildcard ``0.0.0.0`` ``RHO_ADVERTISE``, Slurm's node name, the host name).
    An endpoint beyond loopback needs the secret. ``reference``: the reference model's
    fingerprint the scores must come from (``sha256:...``); unset, the first scored batch's
    (or the one in a cursor given to :meth:`load_state_dict`). A scored batch of another
    reference, or with a reference loss that is not finite at a valid position, is never
    yielded: its selector is told to stop (``shutdown`` with the reason) and the batch is scored
    again by another selector when its lease runs out (docs/PROTOCOL.md).
    """

    def __init__(
        self,
        loader: str,
        run_id: str,
        *,
        scored: bool = True,
        delivery: str = "tcp://127.0.0.1:0",
        secret: Optional[bytes] = None,
        secret_file: Optional[str] = None,
        credits_per_selector: int = 2,
        reorder_window: int = 64,
        prefetch: int = 2,
        heartbeat_secs: float = 1.0,
        peer_timeout_secs: float = 30.0,
        rank: int = 0,
        world: int = 1,
        as_torch: bool = False,
        pin_memory: bool = False,
        limits: Optional[Limits] = None,
        reference: Optional[str] = None,
        metrics: Optional[str] = None,
        advertise: Optional[str] = None,
    ):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} / world {world}: need 0 <= rank < world")
        if peer_timeout_secs <= heartbeat_secs:
            raise ValueError("peer_timeout_secs must be larger than heartbeat_secs")
        self.loader, self.run_id, self.scored = loader, run_id, scored
        self.key = Key(secret) if secret is not None else Key.from_config(secret_file)
        check_secret(loader, self.key)
        if scored:
            check_secret(delivery, self.key)
        self.credits_per_selector, self.reorder_window, self.prefetch = credits_per_selector, reorder_window, prefetch
        self.heartbeat_secs, self.peer_timeout_secs = heartbeat_secs, peer_timeout_secs
        self.rank, self.world = rank, world
        self.as_torch, self.pin_memory, self.limits = as_torch, pin_memory, limits or Limits()
        self.stats = Stats()
        # The run's reference model, once known (the I/O thread fixes it from the first batch).
        self.reference: Optional[str] = reference
        # The stream's identity, once known (the first batch, or a cursor's).
        self.stream: Optional[Dict[str, Any]] = None
        self.total: Optional[int] = None
        # The cursor: the next sequence number the training loop needs.
        self._next_seq = rank
        self._yielded: Optional[int] = None
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._commands: "queue.Queue[tuple]" = queue.Queue()
        self._stop = threading.Event()
        self._ctx = zmq.Context.instance()
        self._delivery = None
        self.delivery_endpoint: Optional[str] = None
        if scored:
            self._delivery = self._ctx.socket(zmq.ROUTER)
            self._delivery.setsockopt(zmq.LINGER, 0)
            # A peer claiming a frame past the limit is dropped before anything is reserved.
            self._delivery.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
            self._delivery.bind(delivery)
            # What selectors connect to: the bound endpoint, its host advertised.
            bound = self._delivery.getsockopt_string(zmq.LAST_ENDPOINT)
            self.delivery_endpoint = advertised(bound, advertise)
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        # Progress lines (``metrics``): one a second at most, and one at the end.
        self._metrics = open(metrics, "a") if metrics else None
        self._started = time.monotonic()
        self._waited = 0.0
        self._last_line = 0.0

    @classmethod
    def from_env(cls, **overrides: Any) -> "RhoStream":
        """The stream of this process's rank, as ``rho run`` describes it in the environment
        (docs/SCALING.md, "Environment"): ``RHO_LOADER``, ``RHO_RUN_ID``, ``RHO_SCORED`` (``1``
        or ``0``), ``RHO_DELIVERY`` (the endpoint to bind for selectors), ``RHO_DELIVERY_FILE``
        (where to write the bound one), ``RHO_SECRET_FILE``, and torchrun's ``RANK`` and
        ``WORLD_SIZE``. ``{rank}`` in an endpoint or file name is replaced by the rank; keyword
        arguments override what the environment says."""
        env = os.environ
        rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))

        def need(name: str) -> str:
            value = env.get(name)
            if not value:
                raise ValueError(f"{name} is not set: run this under `rho run`, or pass the setting")
            return value.format(rank=rank)

        args: Dict[str, Any] = dict(rank=rank, world=world, scored=env.get("RHO_SCORED", "1") != "0")
        if env.get("RHO_DELIVERY"):
            args["delivery"] = env["RHO_DELIVERY"].format(rank=rank)
        if env.get("RHO_SECRET_FILE"):
            args["secret_file"] = env["RHO_SECRET_FILE"]
        if env.get("RHO_METRICS"):
            args["metrics"] = env["RHO_METRICS"].format(rank=rank)
        if env.get("RHO_ADVERTISE"):
            args["advertise"] = env["RHO_ADVERTISE"]
        args.update(overrides)
        loader = args.pop("loader", None) or need("RHO_LOADER")
        run_id = args.pop("run_id", None) or need("RHO_RUN_ID")
        stream = cls(loader, run_id, **args)
        file = env.get("RHO_DELIVERY_FILE")
        if stream.delivery_endpoint and file:
            # Written whole, then renamed: a reader never sees half an endpoint.
            path = file.format(rank=rank)
            with open(path + ".tmp", "w") as f:
                f.write(stream.delivery_endpoint)
            os.replace(path + ".tmp", path)
        return stream

    # The cursor, for checkpoints.

    def state_dict(self) -> Dict[str, Any]:
        """The stream cursor: save it with the model; :meth:`load_state_dict` resumes there."""
        nxt = self._next_seq if self._yielded is None else self._yielded + self.world
        state = {"run_id": self.run_id, "next_seq": nxt, "rank": self.rank, "world": self.world}
        if self.reference is not None:
            state["reference"] = self.reference
        if self.stream is not None:
            state["stream"] = self.stream
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the stream at a saved cursor (before iterating, or at any time).

        The cursor may be any rank's of any number of ranks: the ranks of a data-parallel run
        step together, so a cursor ``next_seq`` of rank ``r`` names the global cursor
        ``next_seq - r`` (every batch before it was trained), and this rank continues at the
        global cursor plus its own rank. So every rank of a run resumed on another number of
        ranks loads the same checkpoint (rank 0's, as DDP writes it), and the loader splits the
        stream from the global cursor on among the new ranks."""
        if state.get("run_id") != self.run_id:
            raise ValueError(f"the cursor belongs to run {state.get('run_id')!r}, not {self.run_id!r}")
        saved_rank, saved_world = int(state.get("rank", 0)), int(state.get("world", 1))
        if not 0 <= saved_rank < saved_world or int(state["next_seq"]) < saved_rank:
            raise ValueError(f"cursor {state['next_seq']} is not one of rank {saved_rank} of {saved_world}")
        nxt = int(state["next_seq"]) - saved_rank + self.rank
        if saved_world != self.world:
            log.info(
                "resuming a cursor of %d rank(s) on %d: global cursor %d, rank %d continues at %d",
                saved_world, self.world, nxt - self.rank, self.rank, nxt,
            )
        saved = state.get("reference")
        if saved is not None:
            if self.reference is not None and self.reference != saved:
                raise ValueError(
                    f"the cursor was trained against the reference model {saved}, not {self.reference}: "
                    "one run trains against one reference"
                )
            self.reference = saved
        if state.get("stream") is not None:
            self.stream = state["stream"]
        self._yielded = None
        self._next_seq = nxt
        if self._thread is not None:
            # Drop what is queued; the I/O thread resumes the loader.
            while True:
                try:
                    self._out.get_nowait()
                except queue.Empty:
                    break
            self._commands.put(("resume", nxt))

    # Iteration.

    def __iter__(self):
        self.start()
        return self

    def start(self) -> "RhoStream":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="rho-stream", daemon=True)
            self._thread.start()
        return self

    def __next__(self) -> Batch:
        self.start()
        if self._yielded is not None:
            # The previous batch is consumed: acknowledge it.
            self._commands.put(("ack", self._yielded))
            self._next_seq = self._yielded + self.world
            self._yielded = None
        waiting = time.monotonic()
        while True:
            if self.total is not None and self._next_seq >= self.total:
                raise StopIteration
            try:
                item = self._out.get(timeout=0.5)
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError(f"rho_stream I/O thread failed: {self._error}") from self._error
                continue
            if item is _END:
                raise StopIteration
            if item.seq != self._next_seq:
                continue  # left over from before a resume
            self._yielded = item.seq
            self.stats.batches += 1
            now = time.monotonic()
            self._waited += now - waiting
            if now - self._last_line >= 1.0:
                self._write_line(now)
            return self._convert(item)

    def _write_line(self, now: float) -> None:
        """One progress line, whole (a line that cannot be written is skipped)."""
        if self._metrics is None:
            return
        self._last_line = now
        elapsed = max(now - self._started, 1e-9)
        line = {
            "elapsed_s": round(elapsed, 3), "rank": self.rank, "batches": self.stats.batches,
            "seq": self._yielded, "data_wait_fraction": round(self._waited / elapsed, 4),
        }
        try:
            self._metrics.write(json.dumps(line) + "\n")
            self._metrics.flush()
        except OSError as e:
            log.warning("cannot write a progress line: %s", e)

    def _convert(self, b: Batch) -> Batch:
        if not self.as_torch:
            return b
        import torch

        def t(a):
            x = torch.from_numpy(np.array(a, copy=True))
            return x.pin_memory() if self.pin_memory else x

        b.tokens = t(b.tokens.astype(np.int64))
        if b.ref_loss is not None:
            b.ref_loss = t(b.ref_loss)
        return b

    def close(self) -> None:
        """Acknowledges the last batch, stops the I/O thread and closes the sockets."""
        if self._yielded is not None:
            self._commands.put(("ack", self._yielded))
        if self._metrics is not None:
            self._write_line(time.monotonic())
            self._metrics.close()
            self._metrics = None
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._delivery is not None:
            self._delivery.close(0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # The I/O thread.

    def _loader_socket(self):
        s = self._ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.MAXMSGSIZE, self.limits.max_message_bytes)
        s.connect(self.loader)
        return s

    def _heartbeat(self):
        return control("heartbeat", self.run_id, self.key, role="trainer", at_ms=int(time.time() * 1000))

    def _send(self, sock, frames, peer: Optional[bytes] = None) -> None:
        try:
            sock.send_multipart(([peer] if peer is not None else []) + frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # no connected peer now; liveness brings it back

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # surfaced by __next__
            self._error = e
            log.exception("rho_stream I/O thread failed")

    def _loop(self) -> None:
        run_id, key = self.run_id, self.key
        loader = self._loader_socket()
        buffer: Dict[int, Batch] = {}
        owed: List[bytes] = []
        known = set()
        requested = 0
        cursor = self._next_seq  # the next sequence number to hand over, in order
        heard = time.monotonic()
        last_beat = 0.0
        ended = False
        if cursor != self.rank:
            self._send(loader, self._resume(cursor))
        self._send(loader, self._heartbeat())
        poller = zmq.Poller()
        poller.register(loader, zmq.POLLIN)
        if self._delivery is not None:
            poller.register(self._delivery, zmq.POLLIN)

        def held() -> int:
            return len(buffer) + self._out.qsize()

        def accept(b: Batch, peer: Optional[bytes]) -> None:
            nonlocal requested
            if not self.scored:
                requested = max(requested - 1, 0)
            self._check_stream(b)
            if not self._is_mine(b, cursor):
                self.stats.messages_rejected += 1
                log.warning("refused batch %d: not a batch of rank %d of %d", b.seq, self.rank, self.world)
            elif b.seq < cursor or b.seq in buffer:
                self.stats.duplicates += 1
            else:
                buffer[b.seq] = b
            if peer is not None:
                if held() < self.reorder_window:
                    self._send(self._delivery, control("credit", run_id, key, n=1), peer)
                else:
                    owed.append(peer)

        while not self._stop.is_set():
            now = time.monotonic()
            # Commands from the training loop.
            while True:
                try:
                    cmd, arg = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd == "ack":
                    self._send(loader, control("ack", run_id, key, seqs=[arg]))
                    if owed and self._delivery is not None:
                        self._send(self._delivery, control("credit", run_id, key, n=1), owed.pop(0))
                elif cmd == "resume":
                    cursor = arg
                    ended = False
                    buffer.clear()
                    requested = 0
                    self._send(loader, self._resume(arg))
            # Hand over what is next in order.
            while cursor in buffer:
                self._out.put(buffer.pop(cursor))
                cursor += self.world
            # Plain causal LM: ask the loader directly.
            if not self.scored and self.total is None:
                want = self.prefetch - (requested + held())
                if want > 0:
                    self._send(loader, control("credit", run_id, key, n=want, **self._rank_fields()))
                    requested += want
            # Liveness.
            if now - last_beat >= self.heartbeat_secs:
                last_beat = now
                self._send(loader, self._heartbeat())
                if self.total is None and now - heard > self.peer_timeout_secs:
                    log.warning("the loader fell silent; reconnecting to %s", self.loader)
                    poller.unregister(loader)
                    loader.close(0)
                    loader = self._loader_socket()
                    poller.register(loader, zmq.POLLIN)
                    requested = 0
                    heard = now
                    self.stats.reconnects += 1
                    self._send(loader, self._resume(cursor))
            for sock, _ in poller.poll(timeout=20):
                while True:
                    try:
                        frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
                    except zmq.Again:
                        break
                    peer = None
                    if sock is self._delivery:
                        peer, frames = frames[0], frames[1:]
                    else:
                        heard = time.monotonic()
                    try:
                        m = decode(frames, self.limits, key)
                    except ProtocolError as e:
                        self.stats.messages_rejected += 1
                        log.warning("refused a message: %s", e)
                        continue
                    if m.run_id != run_id:
                        self.stats.messages_rejected += 1
                        log.warning("refused a `%s` message of run %r", m.kind, m.run_id)
                        continue
                    self._handle(m, peer, sock is self._delivery, accept, known)
            if not ended and self.total is not None and cursor >= self.total and not buffer:
                ended = True
                self._out.put(_END)
        loader.close(0)

    def _handle(self, m: Message, peer, from_delivery: bool, accept, known) -> None:
        run_id, key = self.run_id, self.key
        kind = m.kind
        if from_delivery:
            if kind == "heartbeat":
                self._send(self._delivery, self._heartbeat(), peer)
                if peer not in known:
                    known.add(peer)
                    self.stats.selectors_seen += 1
                    self._send(self._delivery, control("credit", run_id, key, n=self.credits_per_selector), peer)
            elif kind == "scored":
                b = self._batch(m)
                why = self._refusal(b)
                if why is not None:
                    self.stats.reference_refused += 1
                    log.warning("refused a scored batch and told its selector to stop: %s", why)
                    self._send(self._delivery, control("shutdown", run_id, key, reason=why), peer)
                    return
                accept(b, peer)
            else:
                self.stats.messages_rejected += 1
                log.warning("refused a `%s` message on the delivery endpoint", kind)
            return
        if kind == "batch" and not self.scored:
            accept(self._batch(m), None)
        elif kind == "end":
            self.total = int(m.header["total"])
        elif kind == "heartbeat":
            pass
        elif kind == "shutdown":
            # A loader refuses a consumer this way (a cursor of another stream): nothing can go on.
            raise RuntimeError(f"the loader refused this stream: {m.header.get('reason')}")
        else:
            self.stats.messages_rejected += 1
            log.warning("refused a `%s` message from the loader", kind)

    def _is_mine(self, b: Batch, cursor: int) -> bool:
        """A batch of this rank: tagged with it by the loader, and on this rank's sequence
        numbers (the cursor's, every ``world``-th)."""
        if b.rank is not None and b.rank != (self.rank, self.world) and self.world > 1:
            return False
        return (b.seq - cursor) % self.world == 0

    def _rank_fields(self) -> Dict[str, int]:
        """What a credit names of this rank: nothing in a one-rank run."""
        return {"rank": self.rank, "world": self.world} if self.world > 1 else {}

    def _resume(self, cursor: int) -> List[bytes]:
        """A resume at ``cursor``, naming the stream it belongs to when known."""
        fields: Dict[str, Any] = {"next_seq": cursor, **self._rank_fields()}
        if self.stream is not None:
            fields["stream"] = self.stream
        return control("resume", self.run_id, self.key, **fields)

    def _check_stream(self, b: Batch) -> None:
        """The first batch fixes the stream's identity; a batch of another stream stops."""
        if b.stream is None:
            return
        if self.stream is None:
            self.stream = b.stream
        elif b.stream != self.stream:
            changed = sorted(k for k in set(self.stream) | set(b.stream) if self.stream.get(k) != b.stream.get(k))
            raise RuntimeError(
                f"batch {b.seq} is not of this stream (changed: {', '.join('loader.' + k for k in changed)}); "
                "resume only on the stream the cursor was trained on"
            )

    def _refusal(self, b: Batch) -> Optional[str]:
        """Why a scored batch is refused, or None; the first one fixes the run's reference."""
        valid = b.valid()
        bad = np.argwhere(valid & ~np.isfinite(np.asarray(b.ref_loss, dtype=np.float32)))
        if len(bad):
            row, pos = (int(x) for x in bad[0])
            value = float(np.asarray(b.ref_loss)[row, pos])
            return (
                f"batch {b.seq}: the reference loss at row {row}, position {pos} is {value}, "
                f"not a finite number (reference {b.ref_model})"
            )
        if self.reference is None:
            self.reference = b.ref_model
            log.info("the run's reference model: %s", b.ref_model)
        elif b.ref_model != self.reference:
            return (
                f"batch {b.seq} was scored by the reference model {b.ref_model}, "
                f"but this run's reference is {self.reference}: one run trains against one reference"
            )
        return None

    @staticmethod
    def _batch(m: Message) -> Batch:
        h = m.header
        return Batch(
            seq=int(h["seq"]),
            epoch=int(h["epoch"]),
            tokenizer=h["tokenizer"],
            lengths=np.asarray(h["lengths"], dtype=np.int64),
            doc_starts=h["doc_starts"],
            tokens=m.tokens,
            ref_loss=m.ref_loss,
            ref_model=h.get("ref_model"),
            stream=h.get("stream"),
            rank=(int(h["rank"]), int(h["world"])) if "rank" in h and "world" in h else None,
        )
