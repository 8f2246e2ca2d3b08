#!/usr/bin/python3
"""Trains the classifier examples/torch-classifier serves and writes its two committed files.

Needs Debian's python3-torch, python3-sklearn and python3-numpy (run with /usr/bin/python3); the
8x8 digits data set ships with scikit-learn, so nothing is downloaded.

  weights.pt  the DigitsMLP state_dict (model.py), saved with torch.save
  test.json   100 held-out images, 10 per digit: [{"image": [64 numbers 0..16], "label": n}]

Seeds are fixed, so a rerun gives the same model; it takes a few seconds on one CPU core.
"""
import json
import os
import sys

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from model import DigitsMLP

HERE = os.path.dirname(os.path.abspath(__file__))


def held_out_sample(x, y, per_class):
    """The first per_class images of each digit, so test.json covers all ten evenly."""
    picks = [i for c in range(10) for i in np.flatnonzero(y == c)[:per_class]]
    return x[picks], y[picks]


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    xt = torch.tensor(x_train, dtype=torch.float32)
    yt = torch.tensor(y_train, dtype=torch.long)

    model = DigitsMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):  # full-batch steps: 1347 images fit in one
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xt), yt)
        loss.backward()
        opt.step()

    model.eval()
    with torch.no_grad():
        pred = model(torch.tensor(x_test, dtype=torch.float32)).argmax(dim=1).numpy()
    accuracy = float((pred == y_test).mean())
    print(f"train.py: final loss {loss.item():.4f}, held-out accuracy {accuracy:.4f} "
          f"on {len(y_test)} images", file=sys.stderr)
    if accuracy < 0.95:
        sys.exit("train.py: the model is not good enough to commit")

    torch.save(model.state_dict(), os.path.join(HERE, "weights.pt"))
    images, labels = held_out_sample(x_test, y_test, 10)
    with open(os.path.join(HERE, "test.json"), "w") as f:
        rows = [json.dumps({"image": [int(p) for p in im], "label": int(l)},
                           separators=(",", ":")) for im, l in zip(images, labels)]
        f.write("[\n" + ",\n".join(rows) + "\n]\n")


if __name__ == "__main__":
    main()
