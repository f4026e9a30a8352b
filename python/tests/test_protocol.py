"""The codec: round trips, signatures, and refusal of malformed messages."""

import json

import numpy as np
import pytest

from rho_stream import Key, Limits, ProtocolError, decode, encode
from rho_stream.protocol import control


def scored_frames(key=None, rows=2, window=4):
    tokens = np.arange(rows * window, dtype="<u4").reshape(rows, window)
    ref = np.linspace(0, 1, rows * (window - 1), dtype="<f4").reshape(rows, window - 1)
    header = {
        "kind": "scored", "run_id": "r", "seq": 3, "epoch": 0, "tokenizer": "sha256:" + "0" * 64,
        "lengths": [window, window - 1], "doc_starts": [[0, 2], []], "ref_model": "sha256:" + "1" * 64,
        "tensors": [
            {"name": "tokens", "dtype": "u32", "shape": [rows, window]},
            {"name": "ref_loss", "dtype": "f32", "shape": [rows, window - 1]},
        ],
    }
    return encode(header, [tokens.tobytes(), ref.tobytes()], key), tokens, ref


def test_round_trip_unsigned_and_signed():
    key = Key(b"0123456789abcdef0123")
    for k in (None, key):
        frames, tokens, ref = scored_frames(k)
        m = decode(frames, Limits(), k)
        assert m.kind == "scored" and m.header["seq"] == 3
        np.testing.assert_array_equal(m.tokens, tokens)
        np.testing.assert_array_equal(m.ref_loss, ref)
    # A signed message read without the secret: the tag frame is ignored.
    frames, _, _ = scored_frames(key)
    assert decode(frames).kind == "scored"


def test_wrong_or_missing_signatures_are_refused():
    key, other = Key(b"0123456789abcdef0123"), Key(b"fedcba9876543210fedc")
    frames, _, _ = scored_frames(other)
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(frames, Limits(), key)
    frames, _, _ = scored_frames(None)
    with pytest.raises(ProtocolError, match="unauthenticated"):
        decode(frames, Limits(), key)
    frames, _, _ = scored_frames(key)
    frames[1] = bytes(frames[1][:-1]) + b"\x01"
    with pytest.raises(ProtocolError):
        decode(frames, Limits(), key)
    with pytest.raises(ValueError):
        Key(b"short")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f[:1],  # tensor frames missing
        lambda f: [f[0], f[1][:-4], f[2]],  # truncated frame
        lambda f: [b"not json"] + f[1:],
        lambda f: [json.dumps({**json.loads(f[0]), "rho": 2}).encode()] + f[1:],
        lambda f: [json.dumps({**json.loads(f[0]), "kind": "nope"}).encode()] + f[1:],
        lambda f: [json.dumps({**json.loads(f[0]), "lengths": [9, 1]}).encode()] + f[1:],
        lambda f: [json.dumps({**json.loads(f[0]), "doc_starts": [[2, 0], []]}).encode()] + f[1:],
        lambda f: [],
    ],
)
def test_malformed_messages_are_refused(mutate):
    frames, _, _ = scored_frames()
    with pytest.raises(ProtocolError):
        decode(mutate(frames))


def test_size_limits_come_first():
    frames, _, _ = scored_frames()
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(frames, Limits(max_message_bytes=16))


def test_control_messages():
    m = decode(control("credit", "r", None, n=4))
    assert m.kind == "credit" and m.header["n"] == 4
    with pytest.raises(ProtocolError):
        decode(control("credit", "r", None, n=-1))
    with pytest.raises(ProtocolError):
        decode(control("ack", "r", None, seqs=[1]) + [b"extra"])


def test_endpoints_beyond_loopback_need_the_secret_and_advertise_a_routable_host(monkeypatch):
    from rho_stream.protocol import advertised, check_secret, reach

    assert [reach(e) for e in ("tcp://127.0.0.1:1", "tcp://[::1]:1", "ipc:///x", "tcp://localhost:2")] == ["local"] * 4
    assert reach("tcp://0.0.0.0:0") == "wildcard" and reach("tcp://*:0") == "wildcard"
    assert reach("tcp://10.0.0.2:5") == "network" and reach("tcp://node-3:5") == "network"
    key = Key(b"0123456789abcdef")
    check_secret("tcp://127.0.0.1:0", None)
    for e in ("tcp://0.0.0.0:0", "tcp://node-3:5"):
        with pytest.raises(ValueError, match="secret"):
            check_secret(e, None)
        check_secret(e, key)
    monkeypatch.setenv("RHO_ADVERTISE", "10.9.0.1")
    assert advertised("tcp://0.0.0.0:4321") == "tcp://10.9.0.1:4321"
    assert advertised("tcp://0.0.0.0:4321", "fd00::1") == "tcp://[fd00::1]:4321"
    assert advertised("tcp://127.0.0.1:4321") == "tcp://127.0.0.1:4321"
