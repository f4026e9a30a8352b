"""rho_stream against real `rho loader` and `rho selector` processes: a whole stream, a resume
mid-stream, a selector killed mid-run, foreign or wrongly signed messages, and scores of another
reference model or not finite."""

import os
import signal

import numpy as np
import zmq
from conftest import RUN_ID, SECRET, wait_until

from rho_stream import Key, RhoStream
from rho_stream.protocol import control, decode, encode


def consume(stream, limit=None, on_batch=None):
    out = {}
    for b in stream:
        out[b.seq] = b
        if on_batch is not None:
            on_batch(b)
        if limit is not None and len(out) >= limit:
            break
    return out


def check_scored(batches):
    seqs = sorted(batches)
    assert seqs == list(range(len(seqs)))
    for b in batches.values():
        valid = b.valid()
        assert b.ref_loss.shape == (b.rows, b.window - 1)
        assert np.all(b.ref_loss[valid] > 0) and np.all(b.ref_loss[~valid] == 0)
        assert b.ref_model.startswith("sha256:")


def test_consumes_a_whole_scored_stream_in_order(pipeline):
    loader = pipeline.loader()
    with RhoStream(loader, RUN_ID, secret=SECRET.encode(), heartbeat_secs=0.2, peer_timeout_secs=2.0) as stream:
        pipeline.selector(loader, stream.delivery_endpoint)
        order = []
        batches = consume(stream, on_batch=lambda b: order.append(b.seq))
    assert len(batches) > 20
    assert order == sorted(order), "in sequence order"
    assert stream.total == len(batches)
    check_scored(batches)
    assert stream.stats.duplicates == 0 and stream.stats.messages_rejected == 0


def test_plain_stream_from_the_loader(pipeline):
    loader = pipeline.loader()
    with RhoStream(loader, RUN_ID, scored=False, secret=SECRET.encode()) as stream:
        batches = consume(stream)
    assert sorted(batches) == list(range(len(batches))) and len(batches) > 20
    assert all(b.ref_loss is None for b in batches.values())


def test_resumes_mid_stream_from_a_state_dict(pipeline):
    loader = pipeline.loader()
    with RhoStream(loader, RUN_ID, scored=False, secret=SECRET.encode()) as stream:
        first = consume(stream, limit=7)
        state = stream.state_dict()
    assert state["next_seq"] == 7
    # A fresh consumer, as after a restart from a checkpoint, on a fresh loader.
    loader2 = pipeline.loader("loader2")
    with RhoStream(loader2, RUN_ID, scored=False, secret=SECRET.encode()) as stream:
        stream.load_state_dict(state)
        rest = consume(stream)
    assert sorted(rest) == list(range(7, 7 + len(rest)))
    # The same batches as an uninterrupted stream.
    loader3 = pipeline.loader("loader3")
    with RhoStream(loader3, RUN_ID, scored=False, secret=SECRET.encode()) as stream:
        whole = consume(stream)
    assert sorted(whole) == sorted(list(first) + list(rest))
    for seq, b in {**first, **rest}.items():
        np.testing.assert_array_equal(b.tokens, whole[seq].tokens)


def test_survives_a_selector_killed_mid_run(pipeline):
    loader = pipeline.loader(lease_secs=1.0)
    with RhoStream(loader, RUN_ID, secret=SECRET.encode(), heartbeat_secs=0.2, peer_timeout_secs=2.0) as stream:
        doomed = pipeline.selector(loader, stream.delivery_endpoint, "selector-a")
        pipeline.selector(loader, stream.delivery_endpoint, "selector-b")
        killed = []

        def kill_after_five(b):
            if b.seq == 5:
                os.kill(doomed.pid, signal.SIGKILL)
                killed.append(True)

        batches = consume(stream, on_batch=kill_after_five)
    assert killed
    assert len(batches) > 20
    check_scored(batches)


def test_foreign_and_wrongly_signed_messages_are_refused(pipeline):
    loader = pipeline.loader()
    with RhoStream(loader, RUN_ID, secret=SECRET.encode(), heartbeat_secs=0.2, peer_timeout_secs=2.0) as stream:
        stream.start()
        ctx = zmq.Context.instance()
        intruder = ctx.socket(zmq.DEALER)
        intruder.setsockopt(zmq.LINGER, 0)
        intruder.connect(stream.delivery_endpoint)
        rows, window = 4, 33
        header = {
            "kind": "scored", "run_id": RUN_ID, "seq": 0, "epoch": 0, "tokenizer": "sha256:" + "0" * 64,
            "lengths": [window] * rows, "doc_starts": [[0]] * rows, "ref_model": "sha256:" + "1" * 64,
            "tensors": [
                {"name": "tokens", "dtype": "u32", "shape": [rows, window]},
                {"name": "ref_loss", "dtype": "f32", "shape": [rows, window - 1]},
            ],
        }
        tensors = [np.zeros((rows, window), "<u4").tobytes(), np.zeros((rows, window - 1), "<f4").tobytes()]
        intruder.send_multipart(encode(header, tensors, Key(b"not-the-run-secret-at-all")))  # wrongly signed
        intruder.send_multipart(encode(header, tensors, None))  # unsigned
        intruder.send_multipart([b"garbage", b"\x00" * 10])
        intruder.send_multipart(control("heartbeat", "other-run", Key(SECRET.encode()), role="selector", at_ms=0))
        wait_until(lambda: stream.stats.messages_rejected >= 4, 10, "the refusals")
        intruder.close(0)
        pipeline.selector(loader, stream.delivery_endpoint)
        batches = consume(stream)
    check_scored(batches)
    # The forged batch 0 was never trained on: batch 0 came from the real selector.
    assert batches[0].ref_loss.max() > 0
    assert stream.stats.messages_rejected == 4


def test_another_reference_or_a_non_finite_score_is_refused_and_scored_again(pipeline):
    loader = pipeline.loader()
    key = Key(SECRET.encode())
    with RhoStream(loader, RUN_ID, secret=SECRET.encode(), heartbeat_secs=0.2, peer_timeout_secs=2.0) as stream:
        stream.start()
        pipeline.selector(loader, stream.delivery_endpoint)
        reasons = []

        def intrude(b):
            if b.seq != 2:
                return
            # The run's reference is the real selector's, fixed by its first batch.
            assert stream.reference == b.ref_model
            ctx = zmq.Context.instance()
            other = ctx.socket(zmq.DEALER)
            other.setsockopt(zmq.LINGER, 0)
            other.connect(stream.delivery_endpoint)
            other.send_multipart(control("heartbeat", RUN_ID, key, role="selector", at_ms=0))
            rows, window = b.rows, b.window
            for ref_model, ref in (
                ("sha256:" + "2" * 64, np.ones((rows, window - 1), "<f4")),
                (stream.reference, np.full((rows, window - 1), np.nan, "<f4")),
            ):
                header = {
                    "kind": "scored", "run_id": RUN_ID, "seq": 5, "epoch": 0, "tokenizer": b.tokenizer,
                    "lengths": [int(x) for x in b.lengths], "doc_starts": b.doc_starts, "ref_model": ref_model,
                    "tensors": [
                        {"name": "tokens", "dtype": "u32", "shape": [rows, window]},
                        {"name": "ref_loss", "dtype": "f32", "shape": [rows, window - 1]},
                    ],
                }
                tokens = np.asarray(b.tokens, dtype="<u4")
                other.send_multipart(encode(header, [tokens.tobytes(), ref.tobytes()], key))
            deadline = 20
            while len(reasons) < 2:
                assert other.poll(deadline * 1000), "no shutdown from the stream"
                m = decode(other.recv_multipart(), key=key)
                if m.kind == "shutdown":
                    reasons.append(m.header["reason"])
            other.close(0)

        batches = consume(stream, on_batch=intrude)
    check_scored(batches)
    assert stream.stats.reference_refused == 2
    assert "sha256:" + "2" * 64 in reasons[0] and stream.reference in reasons[0]
    assert "not a finite number" in reasons[1] and "batch 5" in reasons[1]
    # Batch 5 was trained on with the real selector's scores.
    assert batches[5].ref_model == stream.reference and np.isfinite(batches[5].ref_loss).all()
