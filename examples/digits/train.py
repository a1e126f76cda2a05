"""Train the digits CNN on scikit-learn's bundled digits data and export it to ONNX.

Needs torch (examples and tests only): ``pip install torch==2.13.0 scikit-learn onnx``.
The outputs are committed, so the README's commands never need torch:

* ``digits.onnx``       float32 model, input ``x`` [N, 1, 8, 8], output ``logits`` [N, 10]
* ``calibration.npz``   128 training images for static quantization (``x``)
* ``eval.npz``          held-out images and their labels (``x``, ``labels``)
* ``samples.npz``       8 held-out images for the bundle's golden self-test
* ``labels.txt``        class names
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU6(),  # depthwise
            nn.Conv2d(16, 32, 1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    n_train = 1400
    xtr, ytr, xte, yte = x[:n_train], y[:n_train], x[n_train:], y[n_train:]

    model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for epoch in range(40):
        model.train()
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean()
    print(f"held-out accuracy: {acc:.4f} on {len(yte)} images")

    torch.onnx.export(
        model, (torch.from_numpy(xte[:1]),), str(HERE / "digits.onnx"),
        input_names=["x"], output_names=["logits"],
        dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17, dynamo=False,
    )
    np.savez_compressed(HERE / "calibration.npz", x=xtr[:128])
    np.savez_compressed(HERE / "eval.npz", x=xte, labels=yte)
    np.savez_compressed(HERE / "samples.npz", x=xte[:8])
    (HERE / "labels.txt").write_text("".join(f"{d}\n" for d in range(10)))
    print(f"wrote {HERE / 'digits.onnx'}")


if __name__ == "__main__":
    main()
