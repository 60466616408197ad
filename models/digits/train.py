"""Train the digits classifier on scikit-learn's bundled 8x8 digits (no download).

    python models/digits/train.py --version 1 --arch mlp   # version 1: an MLP
    python models/digits/train.py --version 2 --arch cnn   # version 2: a small CNN

Writes ``models/digits/<version>/model.pt2`` (a torch.export program: loads without unpickling
code), ``metrics.json`` (held-out accuracy and how it was made) and, if missing,
``models/digits/testset.npz`` (the held-out split, used by ``python -m worker demo`` and the
tests). Deterministic: fixed seed, single thread. Needs the ``train`` extra (scikit-learn).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from worker.model import export_model

HERE = Path(__file__).resolve().parent
SEED = 20261126
TEST_FRACTION = 0.2


class DigitsMLP(torch.nn.Module):
    """Pixels 0..16 -> (class probabilities, label)."""

    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10),
        )

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class scores; pixels are scaled to 0..1 inside the model."""
        return self.net(pixels / 16.0)  # type: ignore[no-any-return]

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Clients send raw pixel values (0..16) and get probabilities and the label."""
        probabilities = torch.softmax(self.logits(pixels), dim=1)
        return probabilities, torch.argmax(probabilities, dim=1)


class DigitsCNN(DigitsMLP):
    """The same interface; the 64 pixels are seen as an 8x8 image by two convolutions."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Unflatten(1, (1, 8, 8)),
            torch.nn.Conv2d(1, 16, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, kernel_size=3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(32 * 2 * 2, 10),
        )


ARCHITECTURES = {"mlp": (DigitsMLP, "MLP 64-128-10"), "cnn": (DigitsCNN, "CNN conv16-conv32-fc10")}


def main() -> None:
    """Train, evaluate on the held-out split, export and record the accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", default="1")
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="mlp")
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data.astype(np.float32),
        digits.target.astype(np.int64),
        test_size=TEST_FRACTION,
        random_state=SEED,
        stratify=digits.target,
    )
    model_class, description = ARCHITECTURES[args.arch]
    model = model_class()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(args.epochs):
        order = torch.randperm(len(xt), generator=generator)
        for start in range(0, len(xt), 64):
            idx = order[start : start + 64]
            logits = model.logits(xt[idx])
            loss = torch.nn.functional.cross_entropy(logits, yt[idx])
            optimiser.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimiser.step()
    model.eval()
    with torch.inference_mode():
        _, predicted = model(torch.from_numpy(x_test))
    accuracy = float((predicted.numpy() == y_test).mean())

    out = HERE / args.version
    out.mkdir(exist_ok=True)
    export_model(model, 64, out / "model.pt2")
    metrics = {
        "model": "digits",
        "version": args.version,
        "architecture": description,
        "dataset": "sklearn.datasets.load_digits",
        "test_fraction": TEST_FRACTION,
        "seed": SEED,
        "epochs": args.epochs,
        "train_size": len(x_train),
        "test_size": len(x_test),
        "test_accuracy": round(accuracy, 4),
        "torch": torch.__version__.split("+")[0],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if not (HERE / "testset.npz").exists():
        np.savez_compressed(HERE / "testset.npz", pixels=x_test.astype(np.uint8), labels=y_test)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
