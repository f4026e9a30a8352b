"""The rho wire protocol, version 1 (docs/PROTOCOL.md), in Python.

Every message is one ZeroMQ multipart message: a UTF-8 JSON header frame, then raw little-endian
tensor frames declared by the header's ``tensors`` list, then (with a shared secret) a 32-byte
HMAC-SHA256 tag over every other frame.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

PROTOCOL_VERSION = 1
TAG_BYTES = 32
KINDS = ("batch", "scored", "credit", "ack", "heartbeat", "resume", "shutdown", "end")


class ProtocolError(Exception):
    """A message that is refused: malformed, too large, unsigned or wrongly signed."""


@dataclass(frozen=True)
class Limits:
    """Size bounds applied before a message is looked into."""

    max_message_bytes: int = 256 << 20
    max_header_bytes: int = 16 << 20


class Key:
    """A run's shared secret: signs and checks messages."""

    def __init__(self, secret: bytes):
        if len(secret) < 16:
            raise ValueError(f"a secret needs at least 16 bytes, got {len(secret)}")
        self._secret = bytes(secret)

    @classmethod
    def from_config(cls, secret_file: Optional[str] = None) -> Optional["Key"]:
        """The secret in ``secret_file`` (surrounding whitespace trimmed), else the
        ``RHO_SECRET`` environment variable; ``None`` when neither is set."""
        if secret_file is not None:
            with open(secret_file, "rb") as f:
                text = f.read().decode("utf-8", "replace").strip()
            try:
                return cls(text.encode())
            except ValueError as e:
                raise ValueError(f"secret file {secret_file}: {e}") from None
        env = os.environ.get("RHO_SECRET", "")
        if env:
            return cls(env.strip().encode())
        return None

    def tag(self, frames: Sequence[bytes]) -> bytes:
        mac = hmac.new(self._secret, digestmod=hashlib.sha256)
        for f in frames:
            mac.update(struct.pack("<Q", len(f)))
            mac.update(f)
        return mac.digest()

    def verify(self, frames: Sequence[bytes], tag: bytes) -> bool:
        return hmac.compare_digest(self.tag(frames), tag)


def _host(endpoint: str) -> Optional[str]:
    """The host of a ``tcp://host:port`` endpoint (IPv6 without brackets); ``None`` otherwise."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def reach(endpoint: str) -> str:
    """Where an endpoint can be reached from: ``local`` (loopback or ``ipc://``), ``wildcard``
    (every interface: ``0.0.0.0``, ``*``, ``::``) or ``network``; the rule of ``rho``'s
    ``Endpoint::reach``."""
    import ipaddress

    host = _host(endpoint)
    if host is None:
        return "local"
    if host in ("0.0.0.0", "*", "::"):
        return "wildcard"
    if host.lower() == "localhost":
        return "local"
    try:
        return "local" if ipaddress.ip_address(host).is_loopback else "network"
    except ValueError:
        return "network"


def check_secret(endpoint: str, key: Optional["Key"]) -> None:
    """The rule for every endpoint of a run: one beyond loopback needs the run's secret (anyone
    who reaches its port could otherwise feed or read the stream). Raises ``ValueError``."""
    if key is None and reach(endpoint) != "local":
        raise ValueError(
            f"`{endpoint}` is reachable beyond this host, and this process has no secret: a run "
            "bound or connected beyond loopback must be signed (pass `secret_file`, or set "
            "RHO_SECRET, the same for every process of the run; `rho run` makes one)"
        )


def advertised_host() -> str:
    """The name other hosts reach this one by: ``RHO_ADVERTISE``, else Slurm's node name
    (``SLURMD_NODENAME``), else the host name."""
    import socket

    for name in ("RHO_ADVERTISE", "SLURMD_NODENAME"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return socket.gethostname() or "localhost"


def advertised(bound: str, advertise: Optional[str] = None) -> str:
    """The endpoint other processes connect to, of one bound at ``bound`` (port picked): its host
    replaced by ``advertise``, or a wildcard host by :func:`advertised_host`."""
    if advertise:
        host = advertise
    elif reach(bound) == "wildcard":
        host = advertised_host()
    else:
        return bound
    port = bound.rsplit(":", 1)[-1]
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


@dataclass
class Message:
    """A decoded message: its header, and for ``batch`` / ``scored`` its arrays."""

    header: dict
    tokens: Optional[np.ndarray] = None
    ref_loss: Optional[np.ndarray] = None

    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def run_id(self) -> str:
        return self.header["run_id"]


def encode(header: dict, tensors: Sequence[bytes] = (), key: Optional[Key] = None) -> List[bytes]:
    """Frames of a message: the header (with ``rho`` and, when signed, ``auth`` set), the
    tensor frames, and the tag when ``key`` is given."""
    h = dict(header)
    h["rho"] = PROTOCOL_VERSION
    if key is not None:
        h["auth"] = "hmac-sha256"
    frames = [json.dumps(h, separators=(",", ":")).encode()] + [bytes(t) for t in tensors]
    if key is not None:
        frames.append(key.tag(frames))
    return frames


def control(kind: str, run_id: str, key: Optional[Key] = None, **fields) -> List[bytes]:
    """Frames of a control message (``credit``, ``ack``, ``heartbeat``, ``resume``, ...)."""
    return encode({"kind": kind, "run_id": run_id, **fields}, (), key)


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53


def decode(frames: Sequence[bytes], limits: Limits = Limits(), key: Optional[Key] = None) -> Message:
    """Decodes and validates a message; raises :class:`ProtocolError` on anything refused.

    Sizes are checked before anything is parsed, and nothing is allocated beyond the frames."""
    frames = [bytes(f) if not isinstance(f, (bytes, memoryview)) else f for f in frames]
    total = sum(len(f) for f in frames)
    if total > limits.max_message_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {limits.max_message_bytes}")
    if not frames:
        raise ProtocolError("empty message")
    if key is not None:
        body, tag = frames[:-1], frames[-1]
        if not body or len(tag) != TAG_BYTES or not key.verify(body, bytes(tag)):
            raise ProtocolError("unauthenticated: missing or wrong tag")
        frames = body
    header_bytes = bytes(frames[0])
    if len(header_bytes) > limits.max_header_bytes:
        raise ProtocolError(f"header of {len(header_bytes)} bytes exceeds {limits.max_header_bytes}")
    try:
        header = json.loads(header_bytes)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("header is not a JSON object")
    if key is None and "auth" in header and len(frames) > 1:
        frames = frames[:-1]  # a signed message read without the secret: drop the tag
    if header.get("rho") != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {header.get('rho')!r}")
    kind = header.get("kind")
    if kind not in KINDS:
        raise ProtocolError(f"unknown kind {kind!r}")
    if not isinstance(header.get("run_id"), str):
        raise ProtocolError("missing `run_id`")
    tensors = frames[1:]
    if kind not in ("batch", "scored"):
        if tensors:
            raise ProtocolError(f"a `{kind}` message has no tensor frames")
        _check_control(header)
        return Message(header)
    return _decode_data(header, tensors)


def _check_control(h: dict) -> None:
    kind = h["kind"]
    need = {
        "credit": ("n",),
        "resume": ("next_seq",),
        "end": ("total",),
        "heartbeat": ("at_ms",),
    }.get(kind, ())
    for f in need:
        if not _is_uint(h.get(f)):
            raise ProtocolError(f"`{kind}`: `{f}` must be a non-negative integer")
    if kind == "ack":
        seqs = h.get("seqs")
        if not isinstance(seqs, list) or not all(_is_uint(s) for s in seqs):
            raise ProtocolError("`ack`: `seqs` must be an array of integers")


def _decode_data(h: dict, tensors: Sequence[bytes]) -> Message:
    kind = h["kind"]
    for f in ("seq", "epoch"):
        if not _is_uint(h.get(f)):
            raise ProtocolError(f"`{kind}`: `{f}` must be a non-negative integer")
    if not isinstance(h.get("tokenizer"), str):
        raise ProtocolError(f"`{kind}`: missing `tokenizer`")
    lengths, starts, desc = h.get("lengths"), h.get("doc_starts"), h.get("tensors")
    if not isinstance(lengths, list) or not lengths or not all(_is_uint(x) for x in lengths):
        raise ProtocolError(f"`{kind}`: `lengths` must be a non-empty array of integers")
    rows = len(lengths)
    if not isinstance(desc, list) or not desc or not isinstance(desc[0], dict):
        raise ProtocolError(f"`{kind}`: missing `tensors`")
    shape = desc[0].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_uint(x) for x in shape)):
        raise ProtocolError(f"`{kind}`: bad `tokens` shape")
    b, w = shape
    expected = [{"name": "tokens", "dtype": "u32", "shape": [rows, w]}]
    if kind == "scored":
        expected.append({"name": "ref_loss", "dtype": "f32", "shape": [rows, w - 1]})
        if not isinstance(h.get("ref_model"), str):
            raise ProtocolError("`scored`: missing `ref_model`")
    if b != rows or w < 2 or desc != expected:
        raise ProtocolError(f"`{kind}`: `tensors` must be exactly {expected}")
    if len(tensors) != len(expected):
        raise ProtocolError(f"`{kind}`: {len(tensors)} tensor frames, expected {len(expected)}")
    for d, t in zip(expected, tensors):
        size = d["shape"][0] * d["shape"][1] * 4
        if len(t) != size:
            raise ProtocolError(f"`{kind}`: frame `{d['name']}` has {len(t)} bytes, expected {size}")
    if any(x > w for x in lengths):
        raise ProtocolError(f"`{kind}`: a `lengths` entry exceeds the window {w}")
    if not isinstance(starts, list) or len(starts) != rows:
        raise ProtocolError(f"`{kind}`: `doc_starts` must have one array per row")
    for row in starts:
        if not isinstance(row, list) or not all(_is_uint(x) and x < w for x in row):
            raise ProtocolError(f"`{kind}`: `doc_starts` entries must be positions in the window")
        if any(a >= c for a, c in zip(row, row[1:])):
            raise ProtocolError(f"`{kind}`: `doc_starts` must be strictly increasing")
    tokens = np.frombuffer(tensors[0], dtype="<u4").reshape(rows, w)
    ref = None
    if kind == "scored":
        ref = np.frombuffer(tensors[1], dtype="<f4").reshape(rows, w - 1)
    return Message(h, tokens, ref)
