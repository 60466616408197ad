"""Train the iris classifier on scikit-learn's bundled iris data (no download).

    python models/iris/train.py [--version 1]

Writes ``models/iris/<version>/model.pt2`` (torch.export) and ``metrics.json`` (held-out
accuracy). Standardisation is inside the model, so clients send raw measurements in cm.
Deterministic: fixed seed, single thread. Needs the ``train`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split

from worker.model import export_model

HERE = Path(__file__).resolve().parent
SEED = 20261126


class IrisMLP(torch.nn.Module):
    """Measurements (cm) -> (class probabilities, label)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: np.ndarray, std: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("mean", torch.from_numpy(mean.astype(np.float32)))
        self.register_buffer("std", torch.from_numpy(std.astype(np.float32)))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
        )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores of standardised measurements."""
        return self.net((features - self.mean) / self.std)  # type: ignore[no-any-return]

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and label."""
        probabilities = torch.softmax(self.logits(features), dim=1)
        return probabilities, torch.argmax(probabilities, dim=1)


def main() -> None:
    """Train, evaluate on the held-out split, export, record the accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="1")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    iris = load_iris()
    x_train, x_test, y_train, y_test = train_test_split(
        iris.data.astype(np.float32), iris.target.astype(np.int64),
        test_size=0.3, random_state=SEED, stratify=iris.target,
    )  # fmt: skip
    model = IrisMLP(x_train.mean(axis=0), x_train.std(axis=0))
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(model.logits(xt), yt)
        optimiser.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimiser.step()
    model.eval()
    with torch.inference_mode():
        _, predicted = model(torch.from_numpy(x_test))
    accuracy = float((predicted.numpy() == y_test).mean())
    out = HERE / args.version
    out.mkdir(exist_ok=True)
    export_model(model, 4, out / "model.pt2")
    metrics = {
        "model": "iris", "version": args.version, "architecture": "MLP 4-16-3",
        "dataset": "sklearn.datasets.load_iris", "test_fraction": 0.3, "seed": SEED,
        "train_size": len(x_train), "test_size": len(x_test),
        "test_accuracy": round(accuracy, 4), "torch": torch.__version__.split("+")[0],
    }  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
