"""The classifier both train.py and server.py use: an MLP 64 -> 64 (ReLU) -> 10 over the raw
8x8 digit pixels (0..16). The /16 scaling lives inside forward(), so callers send raw pixels."""
import torch

INPUTS, HIDDEN, CLASSES = 64, 64, 10


class DigitsMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = torch.nn.Linear(INPUTS, HIDDEN)
        self.out = torch.nn.Linear(HIDDEN, CLASSES)

    def forward(self, pixels):
        return self.out(torch.relu(self.hidden(pixels / 16.0)))
