#!/usr/bin/python3
"""Trains the digits classifier that examples/digits serves, and writes its two committed files.

Needs only Debian's python3-sklearn and python3-numpy; the data set (8x8 images of handwritten
digits, pixel values 0..16) ships with scikit-learn, so nothing is downloaded.

  weights.safetensors  the MLP 64 -> 32 (ReLU) -> 10 (softmax) in moonserve.nn's layout:
                       layers.N.weight [out, in] and layers.N.bias [out], F32 (docs/nn.md)
  test.json            the held-out quarter of the data set: [{"pixels": [64 numbers], "label": n}]

The network is trained on pixels / 16; that scaling is folded into the first layer's weights, so
the deployment feeds the raw 0..16 pixels. Run again to reproduce both files exactly (fixed seeds).
"""
import json
import os
import struct
import sys

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

HERE = os.path.dirname(os.path.abspath(__file__))


def write_safetensors(path, tensors, metadata):
    """The safetensors format by hand: an 8-byte little-endian header length, a JSON header
    (name -> dtype, shape, data_offsets into the data section), then the raw tensors."""
    header, blobs, offset = {"__metadata__": metadata}, [], 0
    for name, array in tensors:
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # pad so the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def forward(layers, x):
    """The forward pass moonserve.nn runs, in numpy: ReLU between layers, softmax at the end."""
    for i, (w, b) in enumerate(layers):
        x = x @ w.T + b
        if i + 1 < len(layers):
            x = np.maximum(x, 0)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def main():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    clf = MLPClassifier(hidden_layer_sizes=(32,), activation="relu", max_iter=1000,
                        random_state=0)
    clf.fit(x_train / 16.0, y_train)

    # sklearn stores coefs_[i] as [in, out]; moonserve.nn wants [out, in].
    layers = [(w.T.astype(np.float32), b.astype(np.float32))
              for w, b in zip(clf.coefs_, clf.intercepts_)]
    layers[0] = (layers[0][0] / np.float32(16.0), layers[0][1])  # raw pixels in

    accuracy = float((clf.predict(x_test / 16.0) == y_test).mean())
    ours = forward(layers, x_test.astype(np.float32)).argmax(axis=1)
    agree = float((ours == clf.predict(x_test / 16.0)).mean())
    print(f"test accuracy {accuracy:.4f} on {len(y_test)} images; "
          f"numpy forward agrees with sklearn on {agree:.4f}", file=sys.stderr)
    if accuracy < 0.95 or agree < 1.0:
        sys.exit("train.py: the model is not good enough to commit")

    tensors = []
    for i, (w, b) in enumerate(layers):
        tensors += [(f"layers.{i}.weight", w), (f"layers.{i}.bias", b)]
    write_safetensors(os.path.join(HERE, "weights.safetensors"), tensors,
                      {"activation": "relu", "output": "softmax",
                       "source": "examples/digits/train.py (sklearn MLPClassifier 64-32-10)"})
    with open(os.path.join(HERE, "test.json"), "w") as f:
        f.write("[\n")
        rows = [json.dumps({"pixels": [int(p) for p in px], "label": int(y)},
                           separators=(",", ":")) for px, y in zip(x_test, y_test)]
        f.write(",\n".join(rows))
        f.write("\n]\n")


if __name__ == "__main__":
    main()
