"""Regenerate the example models bundled in examples/models (needs torch; `make run` does not).

Each is a small real model with fixed random weights, saved the way users save theirs, together with a
reference input and the training framework's own output for it, so the demo can show that fastlstm
reproduces the framework's numbers without the framework installed.

    python examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent / "models"


class KeywordSpotter(nn.Module):
    """A streaming classifier: 1-layer LSTM over 32 audio features, a dense softmax head per frame."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.fc = nn.Linear(64, 12)

    def forward(self, x):
        y, _ = self.lstm(x)
        return torch.softmax(self.fc(y), dim=-1)


class SensorForecaster(nn.Module):
    """A 2-layer LSTM (I=64, H=128) regressing 4 values per step from 64 sensor channels."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(64, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, 4)

    def forward(self, x):
        y, _ = self.encoder(x)
        return self.head(y)


class IntentTagger(nn.Module):
    """A text model: token ids -> Embedding(200, 32) -> GRU(48) -> LSTM(24) -> 5 intent scores per token
    (two recurrent modules of different kinds and sizes)."""

    vocab_size = 200

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(self.vocab_size, 32)
        self.gru = nn.GRU(32, 48, batch_first=True)
        self.lstm = nn.LSTM(48, 24, batch_first=True)
        self.fc = nn.Linear(24, 5)

    def forward(self, ids):
        y, _ = self.gru(self.embed(ids))
        y, _ = self.lstm(y)
        return self.fc(y)


def main() -> None:
    torch.manual_seed(0)
    HERE.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name, module, features in (("keyword_spotter", KeywordSpotter(), 32),
                                   ("sensor_forecaster", SensorForecaster(), 64),
                                   ("intent_tagger", IntentTagger(), None)):
        module.eval()
        torch.save(module.state_dict(), HERE / f"{name}.pt")
        if features is None:  # token ids
            x = rng.integers(0, module.vocab_size, size=(2, 50))
        else:
            x = rng.normal(size=(2, 50, features)).astype(np.float32)
        with torch.no_grad():
            y = module(torch.from_numpy(x)).numpy()
        np.savez(HERE / f"{name}_reference.npz", x=x, y=y)
        print(f"wrote {name}.pt and its reference input/output")


if __name__ == "__main__":
    main()
