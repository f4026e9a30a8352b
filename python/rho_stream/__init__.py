"""rho_stream: feed a PyTorch (or any Python) training loop from a rho pipeline.

rho's loader and selectors stream token batches with reference losses over ZeroMQ; this package
is the trainer's end of that stream, written from docs/PROTOCOL.md: :class:`RhoStream` yields
batches in sequence order (numpy arrays, or torch tensors), and :func:`slm_loss` is the
Selective Language Modeling loss with exactly the selection of rho's Rust trainer.
"""

from .protocol import Key, Limits, Message, ProtocolError, decode, encode
from .selection import global_select_mask_torch, keep_count, random_key, select_mask, select_mask_torch, slm_loss
from .stream import Batch, RhoStream, Stats

__all__ = [
    "Batch",
    "Key",
    "Limits",
    "Message",
    "ProtocolError",
    "RhoStream",
    "Stats",
    "decode",
    "encode",
    "global_select_mask_torch",
    "keep_count",
    "random_key",
    "select_mask",
    "select_mask_torch",
    "slm_loss",
]
