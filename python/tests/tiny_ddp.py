"""The tiny model the torchrun workers of the tests train under DistributedDataParallel (gloo,
CPU): one all-reduce per step, so that a rank with fewer batches than another would leave it
waiting forever."""

import torch


class TinyDdp:
    def __init__(self, vocab: int):
        torch.manual_seed(0)
        self.vocab = vocab
        model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab))
        self.ddp = torch.nn.parallel.DistributedDataParallel(model)
        self.opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(self, tokens) -> float:
        """One training step of causal LM on ``tokens`` (``[rows, window]``)."""
        tokens = tokens.long()
        logits = self.ddp(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))
        self.opt.zero_grad()
        loss.backward()  # the all-reduce: every rank must take this step
        self.opt.step()
        return float(loss)
