"""How close generated samples come to the training set: nearest-neighbour distances and the ratio test.

A low FID can come from a model that copies its training images. The check used in the
diffusion-memorisation literature (Yoon et al. 2023; Gu et al. 2023, "On memorization in
diffusion models") counts a sample as memorised when its Euclidean distance to the nearest
training image is below ``1/3`` of the distance to the second nearest: a near-copy of one image
is much closer to it than to any other, while a new image sits between several at similar
distances. The same test in a feature space (the FID's own features) is less fooled by small
shifts in pixel values.

The maths here is plain tensors. :class:`NearestTwo` keeps, for fixed queries, the two smallest
distances to the reference rows seen so far, so the training set can be streamed in chunks (its
pixels or features never need to be in memory at once); :func:`summary` turns the two distances
into the recorded figures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lintrans.errors import UsageError

RATIO = 1 / 3  # nearest / second-nearest distance below this: memorised


class NearestTwo:
    """Running nearest and second-nearest Euclidean distances from ``queries`` (rows) to streamed references.

    Squared distances are expanded as ``|a|^2 + |b|^2 - 2 a.b`` (one matmul per chunk) after
    centring both sides on the queries' mean, so the common offset costs no precision; in float32
    a distance is then accurate to about ``1e-3`` of the data's norm, far below the gap the ratio
    test looks for.
    """

    def __init__(self, queries: Tensor) -> None:
        flat = queries.flatten(1)
        self.centre = flat.mean(0)
        self.queries = flat - self.centre
        self.query_sq = self.queries.pow(2).sum(1, keepdim=True)
        self.best = torch.full((len(flat), 2), math.inf, dtype=flat.dtype, device=flat.device)  # squared
        self.index = torch.full((len(flat), 2), -1, dtype=torch.long, device=flat.device)
        self.seen = 0

    def update(self, reference: Tensor) -> None:
        """Take the next rows of the reference set (their indices continue from the previous chunk)."""
        b = reference.flatten(1).to(self.queries) - self.centre
        dist2 = (self.query_sq + b.pow(2).sum(1) - 2.0 * self.queries @ b.T).clamp_min(0.0)
        values, idx = dist2.topk(min(2, len(b)), dim=1, largest=False)
        merged = torch.cat([self.best, values], dim=1)
        merged_idx = torch.cat([self.index, idx + self.seen], dim=1)
        self.best, order = merged.topk(2, dim=1, largest=False)
        self.index = merged_idx.gather(1, order)
        self.seen += len(b)

    def distances(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(nearest, second_nearest, nearest_index)``, each ``(n,)``."""
        if self.seen < 2:
            raise UsageError(f"memorisation needs at least 2 training images to compare with, got {self.seen}")
        d = self.best.sqrt()
        return d[:, 0], d[:, 1], self.index[:, 0]


def summary(nearest: Tensor, second: Tensor, ratio: float = RATIO) -> dict[str, float]:
    """The ratio test and the distances, as plain floats.

    ``memorised_fraction``: share of samples with ``nearest < ratio * second`` (an exact copy of an
    image that the training set holds twice has both distances 0 and counts as memorised).
    """
    tiny = torch.finfo(second.dtype).tiny
    r = nearest / second.clamp_min(tiny)
    return {
        "memorised_fraction": (r < ratio).double().mean().item(),
        "nn_distance_mean": nearest.double().mean().item(),
        "nn_distance_median": nearest.double().median().item(),
        "second_nn_distance_mean": second.double().mean().item(),
        "ratio_median": r.double().median().item(),
    }
