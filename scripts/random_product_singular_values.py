"""Singular values of ``T(k)`` for ``random_product`` (Gaussian factors) and ``random_rotation_product``.

    .venv/bin/python scripts/random_product_singular_values.py [--size 28] [--levels 1 5 10 20 40]

Writes ``docs/figures/random_product_singular_values.png`` (sorted singular values of the dense
``T(k)`` on ``size x size`` images, a few ``k``, both processes) and prints the largest, median and
smallest singular value per level. The products are built with the processes' own float64
builders (:func:`lintrans.forward.gaussian_products`, :func:`lintrans.forward.rotation_products`)
and the same seeding as ``create_forward(..., forward_seed=0)``, one level at a time. At 28x28
(``n = 784``) it takes about half a minute on one core. Singular values below about
``1e-16 sigma_max`` are float64 rounding noise: the smallest printed value is that floor, not
the true minimum.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lintrans.forward import (  # noqa: E402 - after the path set-up that makes the script runnable
    RandomProduct,
    RandomRotationProduct,
    gaussian_products,
    rotation_products,
    seeded_generator,
)

FIGURE = ROOT / "docs" / "figures" / "random_product_singular_values.png"
ROTATION_STEP = 0.1  # config.model.product_step's default


def singular_values(products, levels: list[int]) -> dict[int, torch.Tensor]:
    """Sorted singular values of the running product at each of ``levels`` (the others are not kept)."""
    wanted, out = set(levels), {}
    for k, product in enumerate(products):
        if k in wanted:
            out[k] = torch.linalg.svdvals(product)
        if k >= max(levels):
            return out
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28, help="image side; n = size^2")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 5, 10, 20, 40])
    parser.add_argument("--out", type=Path, default=FIGURE)
    args = parser.parse_args()
    n, K = args.size**2, max(args.levels)
    processes = {
        "random_product (N(0, 1/n) factors)": singular_values(
            gaussian_products(K, n, seeded_generator(0, RandomProduct.salt)), args.levels
        ),
        f"random_rotation_product (step {ROTATION_STEP})": singular_values(
            rotation_products(K, n, seeded_generator(0, RandomRotationProduct.salt), ROTATION_STEP), args.levels
        ),
    }
    for name, by_level in processes.items():
        for k, s in by_level.items():
            print(f"{name}, n={n}, k={k}: log10 sigma max {s.max().log10():+.2f}, median {s.median().log10():+.2f}, "
                  f"min {s.min().log10():+.2f}")  # fmt: skip

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (name, by_level) in zip(axes, processes.items(), strict=True):
        for k, s in by_level.items():
            ax.semilogy(torch.arange(1, n + 1) / n, s.clamp_min(1e-300), label=f"k = {k}")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("singular value rank / n")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel(r"singular value of $T(k)$")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"T(k) = R_k ... R_1 on {args.size}x{args.size} images (n = {n}); float64 floor ~1e-16 sigma_max")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
