"""Forward processes: dense-matrix agreement, T(0)=I, closed forms, dtypes, batching, stability, theta."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.fft
import torch

from lintrans.errors import UsageError
from lintrans.forward import FORWARD_PROCESSES, dct, dct_2d, gaussian_products, idct_2d, process_class
from tests.conftest import make_process

NAMES = sorted(FORWARD_PROCESSES)
STOCHASTIC = sorted(name for name in NAMES if process_class(name).theta_dim > 0)
SHAPES = [(1, 6, 6), (3, 4, 4)]


def make(name: str, shape=(1, 6, 6), K: int = 7, **params) -> torch.nn.Module:
    return make_process(name, shape, K, **params)


def draw_theta(p, n: int, seed: int = 0) -> torch.Tensor | None:
    """What callers pass: ``(n, theta_dim)`` draws, or ``None`` for a deterministic process."""
    return p.sample_theta(n, torch.Generator().manual_seed(seed))


def row(theta: torch.Tensor | None, i: int) -> torch.Tensor | None:
    return None if theta is None else theta[i]


def test_dct_matches_scipy_and_inverts():
    x = torch.randn(4, 3, 7, 10, dtype=torch.float64)
    np.testing.assert_allclose(dct(x).numpy(), scipy.fft.dct(x.numpy(), norm="ortho", axis=-1), atol=1e-12)
    np.testing.assert_allclose(idct_2d(dct_2d(x)).numpy(), x.numpy(), atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", NAMES)
def test_apply_matches_dense_matrix(name, shape):
    p = make(name, shape)
    x = torch.randn(5, *shape)
    k = torch.tensor([0, 1, 3, 6, 7])  # per-sample levels, including 0 and K
    theta = draw_theta(p, 5)  # per-sample maps of a stochastic process
    y = p(x, k, theta)
    for i, level in enumerate(k.tolist()):
        expected = p.matrix(level, row(theta, i)) @ x[i].double().reshape(-1)
        torch.testing.assert_close(y[i].double().reshape(-1), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_identity_at_level_zero_and_pair(name):
    p = make(name, (3, 4, 4))
    theta = draw_theta(p, 4)
    for i in range(4):
        torch.testing.assert_close(p.matrix(0, row(theta, i)), torch.eye(48, dtype=torch.float64), atol=1e-6, rtol=0)
    x = torch.randn(4, 3, 4, 4)
    k = torch.tensor([1, 2, 7, 4])
    now, prev = p.pair(x, k, theta)
    torch.testing.assert_close(now, p(x, k, theta), atol=1e-6, rtol=0)
    torch.testing.assert_close(prev, p(x, k - 1, theta), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_dtype_is_kept(name, dtype):
    p = make(name, (1, 6, 6))
    x = torch.rand(3, 1, 6, 6).to(dtype)
    k = torch.tensor([1, 5, 7])
    theta = draw_theta(p, 3)
    assert p(x, k, theta).dtype == dtype
    assert all(t.dtype == dtype for t in p.pair(x, k, theta))


def test_mechanics_closed_forms():
    K = 10
    vel, dec = make("constant_velocity", K=K), make("constant_deceleration", K=K)
    d = vel.dim
    for k in range(K + 1):
        torch.testing.assert_close(vel.matrix(k), (1 - k / K) * torch.eye(d, dtype=torch.float64))
        torch.testing.assert_close(dec.matrix(k), (1 - k / K) ** 2 * torch.eye(d, dtype=torch.float64))
    zero = torch.zeros(d, d, dtype=torch.float64)
    torch.testing.assert_close(vel.matrix(K), zero)
    torch.testing.assert_close(dec.matrix(K), zero)
    # deceleration: the discrete velocity shrinks linearly to (almost) rest at K; velocity is constant
    c = dec.coeffs.double()
    v = c[1:] - c[:-1]
    torch.testing.assert_close(v[1:] - v[:-1], torch.full((K - 1,), 2 / K**2, dtype=torch.float64))
    assert abs(v[-1]) < abs(v[0]) / (K - 1) * 1.01
    cv = vel.coeffs.double()
    torch.testing.assert_close(cv[1:] - cv[:-1], torch.full((K,), -1 / K, dtype=torch.float64))


def test_heat_is_the_ihdm_blur():
    p = make("heat", (1, 6, 6), K=7)
    s = torch.exp(torch.linspace(math.log(0.5), math.log(4.0), 7, dtype=torch.float64))
    i = torch.arange(6, dtype=torch.float64)
    for k in (1, 7):
        mask = torch.exp(-(math.pi**2) * (i[:, None] ** 2 + i[None, :] ** 2) / 36 * s[k - 1] ** 2 / 2)
        x = torch.randn(1, 1, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(p(x, torch.tensor([k])), idct_2d(dct_2d(x) * mask), atol=1e-6, rtol=0)


def condition(m: torch.Tensor) -> float:
    s = torch.linalg.svdvals(m)
    return (s.max() / s.min()).item()


def test_random_rotation_product_is_stable_at_K_1000_on_28x28():
    K = 1000
    p = make("random_rotation_product_separable", (1, 28, 28), K=K)
    for k in range(K + 1):
        A, B = p.rows[k].double(), p.cols[k].double()
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        # T(k) = A (x) B on the 784 pixels, and cond(A (x) B) = cond(A) cond(B)
        assert condition(A) * condition(B) < 1e3, k
    x = torch.rand(2, 1, 28, 28)
    assert torch.isfinite(p(x, torch.tensor([K, K // 2]))).all()
    # the dense variant at a smaller size, same K
    dense = make("random_rotation_product", (1, 6, 6), K=K)
    conds = [condition(dense.mats[k].double()) for k in range(0, K + 1, 50)]
    assert max(conds) < 1e3


def test_gaussian_product_stays_finite_at_K_1000():
    """N(0, 1/n) factors: sigma_max grows like sqrt(e k), nothing overflows, at K = 1000.

    The dense builder's float64 running product is checked level by level without storing the
    levels, at 14x14 (at 28x28 the 1000 products of 784x784 matrices take about a minute on one
    core); the separable variant runs end to end at 28x28, where each level is a Kronecker product
    of two 28x28 products.
    """
    K = 1000
    gen = torch.Generator().manual_seed(0)
    for k, product in enumerate(gaussian_products(K, 14 * 14, gen)):
        if k % 100 == 0:
            sigma_max = torch.linalg.matrix_norm(product, ord=2).item()
            assert math.isfinite(sigma_max) and sigma_max < 10 * math.sqrt(math.e * (k + 1)), (k, sigma_max)
    assert torch.isfinite(product).all()
    p = make("random_product_separable", (1, 28, 28), K=K)
    assert torch.isfinite(p.rows).all() and torch.isfinite(p.cols).all()
    x = torch.rand(3, 1, 28, 28)
    y = p(x, torch.tensor([K, K // 2, 1]))
    assert torch.isfinite(y).all() and y.abs().max() < 1e4


def test_random_product_dissipates_and_the_rotation_product_does_not():
    """At k = 40 on 14x14 most singular values of the Gaussian product are tiny (the seed: median
    ~1e-6 at 28x28), the largest near sqrt(e (k+1)) ~ 10; the rotation product keeps them all at 1."""
    k = 40
    gaussian = make("random_product", (1, 14, 14), K=k)
    rotation = make("random_rotation_product", (1, 14, 14), K=k)
    s = torch.linalg.svdvals(gaussian.matrix(k))
    assert s.median() < 1e-4 and 1 < s.max() < 30, (s.median(), s.max())
    decayed = torch.linalg.svdvals(gaussian.matrix(k // 2)).median()
    assert s.median() < decayed * 1e-2  # the decay continues level after level
    torch.testing.assert_close(torch.linalg.svdvals(rotation.matrix(k)), torch.ones(196, dtype=torch.float64))


def test_naive_gaussian_product_breaks_down_at_28x28():
    """The seed's T(k) = R_k ... R_1 with Gaussian R_i: not finite long before K = 1000."""
    gen = torch.Generator().manual_seed(0)
    d, product, broke_at = 28 * 28, torch.eye(28 * 28), None
    for k in range(1, 1001):
        product = torch.randn(d, d, generator=gen) @ product
        if not torch.isfinite(product).all():
            broke_at = k
            break
    assert broke_at is not None and broke_at < 100, broke_at


@pytest.mark.parametrize(
    "name", ["random_fixed", "random_product", "random_rotation_product", "random_fixed_separable"]
)
def test_random_processes_are_reproducible(name):
    a, b = make(name, (1, 6, 6)), make(name, (1, 6, 6))
    for k in (1, 4, 7):
        torch.testing.assert_close(a.matrix(k), b.matrix(k), atol=0, rtol=0)
    other = make(name, (1, 6, 6), forward_seed=99)
    assert not torch.equal(a.matrix(4), other.matrix(4))


def test_dense_storage_refuses_and_separable_works_on_cifar_size():
    with pytest.raises(UsageError, match="random_fixed_separable"):
        make("random_fixed", (3, 32, 32), K=200)
    p = make("random_fixed_separable", (3, 32, 32), K=200)
    x = torch.randn(4, 3, 32, 32)
    y = p(x, torch.tensor([0, 1, 100, 200]))
    assert torch.equal(y[0], x[0]) and torch.isfinite(y).all()
    with pytest.raises(UsageError, match="random_product_separable"):
        make("random_product", (3, 32, 32), K=200, max_bytes=2**20)


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(UsageError) as err:
        make("warp_drive")
    assert "warp_drive" in str(err.value) and all(n in str(err.value) for n in NAMES)


# --------------------------------------------------------------------------- stochastic processes


def test_deterministic_processes_draw_nothing():
    gen = torch.Generator().manual_seed(5)
    before = gen.get_state()
    for name in sorted(set(NAMES) - set(STOCHASTIC)):
        assert make(name).theta_dim == 0 and make(name).sample_theta(4, gen) is None
    assert torch.equal(gen.get_state(), before)  # the streams of deterministic runs are unchanged


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_theta_is_reproducible_and_required(name):
    p = make(name)
    a, b = draw_theta(p, 64, seed=1), draw_theta(p, 64, seed=1)
    assert a.shape == (64, p.theta_dim) and a.dtype == torch.float32 and torch.equal(a, b)
    x, k = torch.randn(2, 1, 6, 6), torch.tensor([3, 3])
    with pytest.raises(UsageError, match=f"forward process '{name}' needs theta of shape \\(2, 1\\)"):
        p(x, k)
    different = torch.tensor([[a.min().item()], [a.max().item()]])
    y = p(x[:1].expand(2, -1, -1, -1), k, different)
    assert not torch.allclose(y[0], y[1])  # theta picks the map


def test_heat_random_scale_scales_the_blur_widths():
    """theta s_k with s_k log-spaced from s_min to s_max is the heat schedule from theta s_min to theta s_max."""
    p = make("heat_random_scale", blur_sigma_min=0.5, blur_sigma_max=4.0, blur_scale_min=0.5, blur_scale_max=2.0)
    theta = draw_theta(p, 2000)
    assert 0.5 <= theta.min() < 0.55 and 1.95 < theta.max() <= 2.0
    x, k = torch.randn(3, 1, 6, 6, dtype=torch.float64), torch.tensor([1, 4, 7])
    for scale in (0.5, 1.0, 1.7):
        heat = make("heat", blur_sigma_min=0.5 * scale, blur_sigma_max=4.0 * scale)
        got = p(x, k, torch.full((3, 1), scale, dtype=torch.float64))
        torch.testing.assert_close(got, heat(x, k), atol=1e-6, rtol=0)
    with pytest.raises(UsageError, match=r"0 < blur_scale_min <= blur_scale_max, got 2\.0 and 1\.0"):
        make("heat_random_scale", blur_scale_min=2.0, blur_scale_max=1.0)


def test_random_choice_picks_one_of_M_random_fixed_families():
    p = make("random_choice", num_choices=3)
    theta = draw_theta(p, 3000)
    counts = torch.bincount(theta[:, 0].long(), minlength=3)
    assert set(theta.flatten().tolist()) == {0.0, 1.0, 2.0} and counts.min() > 900, counts
    fixed = make("random_fixed")
    one = make("random_choice", num_choices=1)
    for k in (1, 7):
        torch.testing.assert_close(one.matrix(k, torch.zeros(1)), fixed.matrix(k), atol=0, rtol=0)
        torch.testing.assert_close(p.matrix(k, torch.zeros(1)), fixed.matrix(k), atol=0, rtol=0)
        assert not torch.equal(p.matrix(k, torch.ones(1)), p.matrix(k, torch.full((1,), 2.0)))
    with pytest.raises(UsageError, match=r"config\.model\.num_choices must be an integer >= 1, got 0"):
        make("random_choice", num_choices=0)


def test_random_choice_storage_counts_every_family():
    from lintrans.forward import check_forward

    one = process_class("random_choice").storage_bytes(10, (1, 6, 6), num_choices=1)
    assert process_class("random_choice").storage_bytes(10, (1, 6, 6), num_choices=4) == 4 * one
    with pytest.raises(UsageError, match="random_choice_separable"):
        check_forward("random_choice", 200, (3, 32, 32), 2**31, forward_seed=0, num_choices=3)
    p = make("random_choice_separable", (3, 32, 32), K=200, num_choices=3)
    x = torch.randn(2, 3, 32, 32)
    y = p(x, torch.tensor([0, 200]), torch.tensor([[2.0], [1.0]]))
    assert torch.equal(y[0], x[0]) and torch.isfinite(y).all()
