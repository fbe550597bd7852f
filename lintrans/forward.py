"""Linear forward processes ``u_k = T(k) u_0`` (or ``T_theta(k) u_0``) and their registry.

Each process is a small ``nn.Module`` keyed by name in ``FORWARD_PROCESSES``; the name in
``config.model.forward`` selects it. A process maps a batch ``x`` of shape ``(B, C, H, W)``
and one level per sample ``k`` (``LongTensor (B,)``, values in ``0..K``) to ``T(k) x``.
``pair`` returns ``(T(k) x, T(k-1) x)`` in one pass where the structure allows it (the
training loss needs both), and ``matrix(k)`` gives the dense ``d x d`` matrix (float64,
``d = C*H*W``) for small images, built independently of ``forward`` so that tests can
check one against the other.

Stochastic processes (the research notes' idea 3, :class:`StochasticProcess`) draw a parameter ``theta``
per sample, independent of ``u_0``, that picks the map ``T_theta(k)``: ``theta_dim > 0``,
``sample_theta(n, generator)`` draws ``(n, theta_dim)`` values from ``p(theta)``, and ``forward``,
``pair`` and ``matrix`` take that ``theta`` (one row per sample; ``matrix`` one row). For a
deterministic process ``theta_dim = 0``, ``sample_theta`` returns ``None`` without touching the
generator, and ``theta`` is ``None`` everywhere: callers pass whatever ``sample_theta`` gave them,
so training, sampling and evaluation have one code path for both kinds.

Adding a process is one class plus a name::

    @register_forward("my_process")
    class MyProcess(ForwardProcess):
        def forward(self, x, k, theta=None): ...
        def matrix(self, k, theta=None): ...

A config file may do exactly that before ``get_config`` returns; the class is then
available wherever that config is loaded (every DDP rank loads it). A process takes plain
values: ``create_forward(name, K, shape, **params)``, where ``params`` are the keyword
arguments of its ``__init__`` beyond ``K`` and ``shape``. :mod:`lintrans.config` reads them from
``config.model`` under the same names (``config_keys``), once, at the edge.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

from lintrans.errors import UsageError, choices

FORWARD_PROCESSES: dict[str, type[ForwardProcess]] = {}

_REDUCED_PRECISION = (torch.float16, torch.bfloat16)


def register_forward(name: str) -> Callable[[type[ForwardProcess]], type[ForwardProcess]]:
    """Class decorator adding a forward process to the registry under ``name``."""

    def decorator(cls: type[ForwardProcess]) -> type[ForwardProcess]:
        FORWARD_PROCESSES[name] = cls
        cls.name = name
        return cls

    return decorator


def process_class(name: str) -> type[ForwardProcess]:
    """The registered class of ``name``, or a :class:`UsageError` listing the valid names."""
    if name not in FORWARD_PROCESSES:
        raise UsageError(
            f"unknown forward process '{name}' (config.model.forward); valid: {choices(FORWARD_PROCESSES)}"
        )
    return FORWARD_PROCESSES[name]


def check_forward(
    name: str, K: int, shape: tuple[int, int, int], max_bytes: int | None = None, **params
) -> type[ForwardProcess]:
    """The class of ``name`` once ``K`` and its memory are known to be possible (nothing is built).

    ``max_bytes`` bounds what the process would keep in memory (``storage_bytes``, which may
    depend on ``params``), whatever its kind: a dense random map at K = 10^4 or a heat schedule at
    K = 10^9 is refused before a single byte is allocated.
    """
    cls = process_class(name)
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise UsageError(f"config.model.K must be an integer >= 1, got {K!r}")
    need = cls.storage_bytes(K, tuple(shape), **params)
    if max_bytes is not None and need > max_bytes:
        hint = f"; use '{name}_separable' instead" if f"{name}_separable" in FORWARD_PROCESSES else ""
        raise UsageError(
            f"forward process '{name}' would store {need / 2**30:.2f} GiB for K={K} at "
            f"{'x'.join(map(str, shape))} (config.model.max_dense_bytes={max_bytes}){hint}"
        )
    return cls


def create_forward(
    name: str, K: int, shape: tuple[int, int, int], max_bytes: int | None = None, **params
) -> ForwardProcess:
    """Build the process ``name`` for horizon ``K`` on images of ``shape`` ``(C, H, W)`` (see :func:`check_forward`)."""
    return check_forward(name, K, shape, max_bytes, **params)(K, tuple(shape), **params)


class ForwardProcess(nn.Module):
    """Base class: ``T(k)`` for ``k = 0..K`` on images of a fixed shape, ``T(0) = I``; deterministic."""

    name: str = ""
    config_keys: tuple[str, ...] = ()  # keyword arguments of __init__, read from config.model
    theta_dim: int = 0  # size of the per-sample parameter theta; 0: deterministic
    # True: the maps come from the training set (fit_data), once per run; the fitted state is the
    # module's state_dict, which the run directory keeps (lintrans.run), so T is fixed afterwards.
    fitted_to_data: bool = False

    def __init__(self, K: int, shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.K: int = K
        self.shape: tuple[int, int, int] = shape

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], **params) -> int:
        """Bytes of the buffers the process keeps: one float per level unless a subclass stores more."""
        return 4 * (K + 1)

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample_theta(self, n: int, generator: torch.Generator) -> Tensor | None:
        """``(n, theta_dim)`` draws from ``p(theta)`` on the generator's device; ``None`` (no draw) here."""
        return None

    def fit_data(self, images: Iterable[Tensor]) -> None:  # pragma: no cover - only fitted_to_data processes
        """Fit the maps to batches of training images (one pass); only where ``fitted_to_data``."""
        raise NotImplementedError

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def pair(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(T(k) x, T(k-1) x)``; subclasses share work between the two where they can."""
        return self(x, k, theta), self(x, k - 1, theta)

    def matrix(self, k: int, theta: Tensor | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def levels(self, k: int | Tensor, batch: int, device: torch.device) -> Tensor:
        """A ``LongTensor (batch,)`` of levels from an int or a tensor."""
        if isinstance(k, Tensor):
            return k.to(device=device, dtype=torch.long).expand(batch)
        return torch.full((batch,), int(k), device=device, dtype=torch.long)


class StochasticProcess(ForwardProcess):
    """``T_theta(k)`` with ``theta ~ p(theta)`` per sample, independent of ``u_0`` (the research notes' idea 3).

    A subclass sets ``theta_dim``, draws ``theta`` in :meth:`sample_theta` and reads it through
    :meth:`theta_of`, which refuses a missing or misshapen ``theta``: a stochastic process has no
    map without one.
    """

    theta_dim = 1

    def sample_theta(self, n: int, generator: torch.Generator) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def theta_of(self, theta: Tensor | None, batch: int) -> Tensor:
        """``theta`` as ``(batch, theta_dim)``; a single row (``matrix``) may be given flat."""
        if theta is not None and batch == 1:
            theta = theta.reshape(1, -1)
        if theta is None or tuple(theta.shape) != (batch, self.theta_dim):
            got = None if theta is None else tuple(theta.shape)
            raise UsageError(
                f"forward process '{self.name}' needs theta of shape ({batch}, {self.theta_dim}) from its "
                f"sample_theta, got {got}"
            )
        return theta


# --------------------------------------------------------------------------- scalar maps


class ScalarProcess(ForwardProcess):
    """``T(k) = c_k I``: a per-level coefficient, cheap and exact in any dtype."""

    def __init__(self, K: int, shape: tuple[int, int, int]) -> None:
        super().__init__(K, shape)
        coeffs = self.coefficients(torch.arange(self.K + 1, dtype=torch.float64), self.K)
        self.register_buffer("coeffs", coeffs.float(), persistent=False)

    @staticmethod
    def coefficients(k: Tensor, K: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        return x * self.coeffs[k].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))

    def matrix(self, k: int, theta: Tensor | None = None) -> Tensor:
        return self.coeffs[k].double().cpu() * torch.eye(self.dim, dtype=torch.float64)


@register_forward("identity")
class Identity(ScalarProcess):
    """``T(k) = I``: the research notes' first experiment (only the noise changes between levels)."""

    @staticmethod
    def coefficients(k: Tensor, K: int) -> Tensor:
        return torch.ones_like(k)


@register_forward("constant_velocity")
class ConstantVelocity(ScalarProcess):
    """``T(k) = (1 - k/K) I``: a particle at ``u_0`` reaching the origin at ``K`` at constant speed."""

    @staticmethod
    def coefficients(k: Tensor, K: int) -> Tensor:
        return 1.0 - k / K


@register_forward("constant_deceleration")
class ConstantDeceleration(ScalarProcess):
    """``T(k) = (1 - k/K)^2 I``: starts with velocity ``-u_0 * 2/K``, comes to rest at the origin at K.

    The research notes write ``(k^2/K^2 - k/K) I``, which gives ``T(0) = 0`` and contradicts its own
    description; ``(1 - k/K)^2`` is the motion it describes (``T(0) = I``, ``T(K) = 0``,
    zero velocity at ``K``).
    """

    @staticmethod
    def coefficients(k: Tensor, K: int) -> Tensor:
        return (1.0 - k / K) ** 2


# --------------------------------------------------------------------------- heat (IHDM)


def dct_matrix(n: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The orthonormal DCT-II matrix ``D`` (``X = D x``); used as an independent reference."""
    i = torch.arange(n, dtype=torch.float64)
    D = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(dtype)


def dct(x: Tensor) -> Tensor:
    """Orthonormal DCT-II along the last dimension through one FFT (Makhoul's reordering)."""
    n = x.shape[-1]
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    V = torch.fft.fft(v, dim=-1)
    k = torch.arange(n, device=x.device, dtype=x.dtype)
    X = (V * torch.exp(-1j * math.pi * k / (2 * n))).real * math.sqrt(2.0 / n)
    X[..., 0] /= math.sqrt(2.0)
    return X


def idct(X: Tensor) -> Tensor:
    """Inverse of :func:`dct` (orthonormal DCT-III) through one inverse FFT."""
    n = X.shape[-1]
    Y = X * math.sqrt(2.0 * n)  # unnormalised DCT-II coefficients Y_k = 2 Re(W_k V_k)
    Y[..., 0] *= math.sqrt(2.0)
    Y_rev = torch.cat([torch.zeros_like(Y[..., :1]), Y[..., 1:].flip(-1)], dim=-1)  # Y_{n-k}
    k = torch.arange(n, device=X.device, dtype=X.dtype)
    V = torch.complex(Y, -Y_rev) / 2 * torch.exp(1j * math.pi * k / (2 * n))
    v = torch.fft.ifft(V, dim=-1).real
    x = torch.empty_like(v)
    half = (n + 1) // 2
    x[..., ::2] = v[..., :half]
    x[..., 1::2] = v[..., half:].flip(-1)
    return x


def dct_2d(x: Tensor) -> Tensor:
    return dct(dct(x).transpose(-1, -2)).transpose(-1, -2)


def idct_2d(X: Tensor) -> Tensor:
    return idct(idct(X).transpose(-1, -2)).transpose(-1, -2)


def blur_schedule(K: int, sigma_min: float, sigma_max: float) -> Tensor:
    """IHDM's blur widths: ``s_0 = 0``, ``s_1..s_K`` log-spaced from ``sigma_min`` to ``sigma_max``."""
    s = torch.exp(torch.linspace(math.log(sigma_min), math.log(sigma_max), K, dtype=torch.float64))
    return torch.cat([torch.zeros(1, dtype=torch.float64), s])


def heat_rates(H: int, W: int) -> Tensor:
    """Heat's damping rate of DCT coefficient ``(i, j)``: ``pi^2 (i^2/H^2 + j^2/W^2)``, ``(H, W)`` float64."""
    fy = (math.pi * torch.arange(H, dtype=torch.float64) / H) ** 2
    fx = (math.pi * torch.arange(W, dtype=torch.float64) / W) ** 2
    return fy[:, None] + fx[None, :]


def diffusion_times(name: str, K: int, blur_sigma_min: float, blur_sigma_max: float) -> Tensor:
    """``s_k^2 / 2`` for IHDM's blur widths (:func:`blur_schedule`), after checking them (``name`` asks)."""
    lo, hi = blur_sigma_min, blur_sigma_max
    if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi < math.inf):
        raise UsageError(f"{name} needs 0 < blur_sigma_min <= blur_sigma_max, got {lo!r} and {hi!r}")
    return blur_schedule(K, lo, hi) ** 2 / 2


@register_forward("heat")
class Heat(ForwardProcess):
    """IHDM's heat dissipation: DCT coefficient ``(i, j)`` times ``exp(-pi^2 (i^2/H^2 + j^2/W^2) s_k^2 / 2)``."""

    config_keys = ("blur_sigma_min", "blur_sigma_max")

    def __init__(self, K: int, shape: tuple[int, int, int], blur_sigma_min: float, blur_sigma_max: float) -> None:
        super().__init__(K, shape)
        _, H, W = self.shape
        self.register_buffer("freq2", heat_rates(H, W).float(), persistent=False)
        t = diffusion_times(self.name, K, blur_sigma_min, blur_sigma_max)
        self.register_buffer("t", t.float(), persistent=False)

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], **params) -> int:
        return 4 * (K + 1) + 4 * shape[1] * shape[2]

    def times(self, k: Tensor, theta: Tensor | None) -> Tensor:
        """Per-sample diffusion times ``s_k^2 / 2``, ``(B,)``."""
        return self.t[k]

    def masks(self, k: Tensor, theta: Tensor | None = None) -> Tensor:
        """Per-sample DCT multipliers, ``(B, 1, H, W)``."""
        return torch.exp(-self.freq2 * self.times(k, theta).view(-1, 1, 1))[:, None]

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        xf = x.float() if x.dtype in _REDUCED_PRECISION else x
        out = idct_2d(dct_2d(xf) * self.masks(k, theta).to(xf.dtype))
        return out.to(x.dtype)

    def pair(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One DCT, two masks, one inverse DCT over both (stacked along the batch)."""
        xf = x.float() if x.dtype in _REDUCED_PRECISION else x
        coeffs = dct_2d(xf)
        masks = self.masks(torch.cat([k, k - 1]), None if theta is None else theta.repeat(2, 1)).to(xf.dtype)
        both = idct_2d(coeffs.repeat(2, 1, 1, 1) * masks).to(x.dtype)
        return both[: len(x)], both[len(x) :]

    def matrix(self, k: int, theta: Tensor | None = None) -> Tensor:
        C, H, W = self.shape
        D = torch.kron(dct_matrix(H), dct_matrix(W))  # row-major vec of D_H X D_W^T
        time = float(self.times(torch.tensor([k], device=self.t.device), theta)[0])
        m = torch.exp(-self.freq2.double().cpu() * time).reshape(-1)
        block = D.T @ torch.diag(m) @ D
        return torch.block_diag(*([block] * C))


@register_forward("heat_random_scale")
class HeatRandomScale(StochasticProcess, Heat):
    """Heat dissipation with a per-sample blur scale: widths ``theta s_k``, ``theta ~ Uniform[a, b]``.

    ``a, b`` are ``blur_scale_min`` and ``blur_scale_max``; ``theta = 1`` is :class:`Heat`. Each
    image dissipates at its own rate, so ``u_K`` alone does not say how far it has been blurred.
    """

    config_keys = (*Heat.config_keys, "blur_scale_min", "blur_scale_max")

    def __init__(
        self,
        K: int,
        shape: tuple[int, int, int],
        blur_sigma_min: float,
        blur_sigma_max: float,
        blur_scale_min: float,
        blur_scale_max: float,
    ) -> None:
        lo, hi = blur_scale_min, blur_scale_max
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and 0 < lo <= hi < math.inf):
            raise UsageError(f"heat_random_scale needs 0 < blur_scale_min <= blur_scale_max, got {lo!r} and {hi!r}")
        super().__init__(K, shape, blur_sigma_min, blur_sigma_max)
        self.scale_min, self.scale_max = float(lo), float(hi)

    def sample_theta(self, n: int, generator: torch.Generator) -> Tensor:
        u = torch.rand((n, 1), generator=generator, device=generator.device)
        return self.scale_min + (self.scale_max - self.scale_min) * u

    def times(self, k: Tensor, theta: Tensor | None) -> Tensor:
        scale = self.theta_of(theta, len(k))[:, 0].to(self.t)
        return self.t[k] * scale**2


@register_forward("pca_heat")
class PCAHeat(ForwardProcess):
    """Heat in the data's own basis: ``T(k) = V diag(exp(-lambda_i s_k^2 / 2)) V^T``.

    ``V``'s columns are the principal components of the training images, most variance first, and
    ``lambda_i`` is heat's ``i``-th smallest rate (its DCT rates over all ``C x H x W`` coefficients,
    sorted): the rates grow with a component's rank as heat's grow with frequency, and the widths
    ``s_k`` are heat's (``blur_sigma_min``, ``blur_sigma_max``). Heat is the special case ``V`` = the DCT
    basis ordered by frequency, which is what an unfitted process holds, so ``pca_heat`` before
    :meth:`fit_data` is ``heat``; the DCT basis is close to the principal components of stationary
    images, and ``pca_heat`` replaces it with the components of this data set.

    The components are those of the uncentred second moment ``E[u u^T]``: ``T`` must stay linear, and
    the first of them, which gets heat's DC rate 0 and is never damped, is then (nearly) the mean
    image's direction, as heat's DC coefficient carries the mean brightness. The limit ``T(K) u_0`` is
    that component plus the next few that ``s_K`` leaves, a low-dimensional distribution.

    :meth:`fit_data` is deterministic (one float64 pass over the images, then ``eigh``): no seed. The
    basis is the module's one persistent buffer, so the run directory stores it as a state dict
    and every later use loads it instead of refitting. Storage: the ``d x d`` basis, dense.
    """

    config_keys = ("blur_sigma_min", "blur_sigma_max")
    fitted_to_data = True

    def __init__(self, K: int, shape: tuple[int, int, int], blur_sigma_min: float, blur_sigma_max: float) -> None:
        super().__init__(K, shape)
        C, H, W = self.shape
        rates = heat_rates(H, W).reshape(-1).repeat(C)  # coefficient (c, i, j) in row-major order
        order = torch.sort(rates, stable=True).indices
        dct_basis = torch.block_diag(*([torch.kron(dct_matrix(H), dct_matrix(W)).T] * C))  # columns: coefficients
        self.register_buffer("rates", rates[order].float(), persistent=False)
        self.register_buffer("basis", dct_basis[:, order].float())
        self.register_buffer("t", diffusion_times(self.name, K, blur_sigma_min, blur_sigma_max).float(),
                             persistent=False)  # fmt: skip

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], **params) -> int:
        d = math.prod(shape)
        return 4 * (K + 1) + 4 * d + 4 * d * d

    def fit_data(self, images: Iterable[Tensor]) -> None:
        """Principal components of the uncentred second moment of the images, most variance first."""
        from lintrans.gaussian_prior import fit_gaussian

        fit = fit_gaussian(images, self.dim)
        second_moment = fit.covariance() + torch.outer(fit.mean, fit.mean)
        _, vectors = torch.linalg.eigh((second_moment + second_moment.T) / 2)
        self.basis.copy_(vectors.flip(1).to(self.basis))

    def _damped(self, coeffs: Tensor, k: Tensor) -> Tensor:
        """Coefficients ``(B, d)`` times each sample's multipliers, back in pixels, in the input's shape."""
        masks = torch.exp(-self.rates * self.t[k][:, None]).to(coeffs.dtype)
        return (coeffs * masks) @ self.basis.T.to(coeffs.dtype)

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        xf = x.float() if x.dtype in _REDUCED_PRECISION else x
        coeffs = xf.reshape(len(x), -1) @ self.basis.to(xf.dtype)
        return self._damped(coeffs, k).reshape(x.shape).to(x.dtype)

    def pair(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One projection onto the basis, two masks, one product back over both."""
        xf = x.float() if x.dtype in _REDUCED_PRECISION else x
        coeffs = xf.reshape(len(x), -1) @ self.basis.to(xf.dtype)
        both = self._damped(coeffs.repeat(2, 1), torch.cat([k, k - 1])).reshape(2 * len(x), *x.shape[1:])
        return both[: len(x)].to(x.dtype), both[len(x) :].to(x.dtype)

    def matrix(self, k: int, theta: Tensor | None = None) -> Tensor:
        V = self.basis.double().cpu()
        m = torch.exp(-self.rates.double().cpu() * float(self.t[k]))
        return (V * m) @ V.T


# --------------------------------------------------------------------------- random maps


def seeded_generator(seed: int, salt: int) -> torch.Generator:
    """A CPU generator from the process's seed, so every rank and every restart agrees."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + salt)


def stack_levels(levels: Iterable[Tensor], count: int, n: int) -> Tensor:
    """``(count, n, n)`` float32 storage filled one level at a time.

    Products are accumulated in float64, but only the running product is kept in float64: a
    float64 copy of every level (twice the stored bytes) would be the peak memory otherwise.
    """
    out = torch.empty(count, n, n)
    for k, level in enumerate(levels):
        out[k] = level
    return out


class MatrixProcess(ForwardProcess):
    """``T(k)`` stored as matrices: dense ``(K+1, d, d)`` or separable row/column factors.

    Dense storage needs ``(K+1) d^2`` floats (``create_forward`` refuses it above
    ``config.model.max_dense_bytes`` and points to the separable variant); the separable variant
    stores ``(K+1)(H^2 + W^2)`` floats and acts as ``T(k) X = A_k X B_k^T`` on every channel
    (``T(k) = I_C (x) A_k (x) B_k``). ``seed`` (``config.model.forward_seed``, by default the run's
    seed) fixes the matrices.
    """

    separable: bool = False
    salt: int = 0
    config_keys = ("forward_seed",)

    def __init__(self, K: int, shape: tuple[int, int, int], forward_seed: int = 0) -> None:
        super().__init__(K, shape)
        _, H, W = self.shape
        gen = seeded_generator(forward_seed, self.salt)
        if self.separable:
            self.register_buffer("rows", self.build(H, gen), persistent=False)
            self.register_buffer("cols", self.build(W, gen), persistent=False)
            return
        self.register_buffer("mats", self.build(self.dim, gen), persistent=False)

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], **params) -> int:
        C, H, W = shape
        per_level = H * H + W * W if cls.separable else (C * H * W) ** 2
        return 4 * (K + 1) * per_level

    def build(self, n: int, gen: torch.Generator) -> Tensor:  # pragma: no cover - abstract
        """``(K+1, n, n)`` float32 matrices with index 0 the identity."""
        raise NotImplementedError

    def index(self, k: Tensor, theta: Tensor | None) -> Tensor:
        """Which stored matrix each sample uses: its level here."""
        return k

    def _apply_level(self, x: Tensor, level: int) -> Tensor:
        if self.separable:
            A, B = self.rows[level].to(x.dtype), self.cols[level].to(x.dtype)
            return A @ x @ B.T
        M = self.mats[level].to(x.dtype)
        return (x.reshape(len(x), -1) @ M.T).reshape(x.shape)

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        """Groups the batch by stored matrix, so each distinct one costs one batched matmul."""
        out = torch.empty_like(x)
        index = self.index(k, theta)
        for level in torch.unique(index).tolist():
            idx = (index == level).nonzero(as_tuple=True)[0]
            out[idx] = self._apply_level(x[idx], level)
        return out

    def matrix(self, k: int, theta: Tensor | None = None) -> Tensor:
        C = self.shape[0]
        i = int(self.index(torch.tensor([k]), theta)[0])
        if self.separable:
            block = torch.kron(self.rows[i].double().cpu(), self.cols[i].double().cpu())
            return torch.block_diag(*([block] * C))
        return self.mats[i].double().cpu()


def gaussian_levels(K: int, n: int, gen: torch.Generator) -> Tensor:
    """``R_0 = I`` and independent ``R_k`` with ``N(0, 1/n)`` entries (``E|R x|^2 = |x|^2``)."""
    mats = torch.randn(K + 1, n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
    mats[0] = torch.eye(n, dtype=torch.float64)
    return mats


def gaussian_products(K: int, n: int, gen: torch.Generator) -> Iterator[Tensor]:
    """``T(0) = I``, ``T(k) = R_k T(k-1)`` with independent ``R_k`` of ``N(0, 1/n)`` entries, in float64.

    The research notes' product of random matrices. With ``N(0, 1)`` entries every factor multiplies norms
    by about ``sqrt(n)`` and float32 overflows within dozens of factors; with ``N(0, 1/n)`` the
    squared singular values of a k-fold product follow the Fuss-Catalan law (large ``n``), whose
    largest value is about ``e (k + 1)``: ``sigma_max`` grows only like ``sqrt(e k)`` (about 10 at
    k = 40, 50 at k = 1000), while the typical singular value shrinks geometrically (the median by
    about ``sqrt(2)`` per factor, ~1e-6 at k = 40). The process dissipates information as heat does.
    Singular values below ``~1e-16 sigma_max`` are rounding noise in float64, and the smallest ones
    underflow harmlessly towards zero; nothing overflows. Yields the running product, one level at
    a time, so a caller can check the numerics without storing every level.
    """
    product = torch.eye(n, dtype=torch.float64)
    yield product
    for _ in range(K):
        product = (torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)) @ product
        yield product


def rotation_products(K: int, n: int, gen: torch.Generator, step: float) -> Iterator[Tensor]:
    """``T(k) = R_k ... R_1`` with near-identity orthogonal factors, stable for any K.

    Each factor is the Cayley transform ``(I - eps A/2)^{-1} (I + eps A/2)`` of a random
    skew-symmetric ``A`` (entries ``N(0, 1/n)``): exactly orthogonal, so the product keeps
    every singular value at 1, an isometry that dissipates nothing (unlike
    :func:`gaussian_products`). The running product is accumulated in float64 and
    re-orthonormalised by QR (sign-fixed, so it stays continuous in k) to remove rounding drift.
    """
    eye = torch.eye(n, dtype=torch.float64)
    product = eye
    yield product
    for _ in range(K):
        G = torch.randn(n, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
        A = (G - G.T) * (step / 2)
        R = torch.linalg.solve(eye - A, eye + A)
        Q, Rtri = torch.linalg.qr(R @ product)
        product = Q * torch.sign(torch.diagonal(Rtri))[None, :]
        yield product


@register_forward("random_fixed")
class RandomFixed(MatrixProcess):
    """A fixed random Gaussian matrix per level (``R_0 = I``), seeded by the config."""

    salt = 1

    def build(self, n: int, gen: torch.Generator) -> Tensor:
        return gaussian_levels(self.K, n, gen).float()


@register_forward("random_fixed_separable")
class RandomFixedSeparable(RandomFixed):
    separable = True


def check_choices(num_choices: int) -> int:
    """``num_choices`` if it is an integer >= 1, else a :class:`UsageError` naming the key."""
    if isinstance(num_choices, bool) or not isinstance(num_choices, int) or num_choices < 1:
        raise UsageError(f"config.model.num_choices must be an integer >= 1, got {num_choices!r}")
    return num_choices


@register_forward("random_choice")
class RandomChoice(StochasticProcess, RandomFixed):
    """One of ``M`` seeded :class:`RandomFixed` map families per sample: ``theta ~ Uniform{0..M-1}``.

    ``M`` is ``num_choices``; family ``m`` is stored at rows ``m (K+1) .. m (K+1) + K`` and
    ``theta`` (a float holding ``m``) picks it. Family 0 is ``random_fixed``'s maps with the same
    seed, so ``M = 1`` is ``random_fixed``. Storage is ``M`` times ``random_fixed``'s (the
    dense/separable budget check counts it).
    """

    config_keys = ("forward_seed", "num_choices")

    def __init__(self, K: int, shape: tuple[int, int, int], forward_seed: int = 0, num_choices: int = 3) -> None:
        self.num_choices = check_choices(num_choices)
        super().__init__(K, shape, forward_seed)

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], num_choices: int = 3, **params) -> int:
        return check_choices(num_choices) * super().storage_bytes(K, shape)

    def build(self, n: int, gen: torch.Generator) -> Tensor:
        family = super().build  # random_fixed's levels, one family per draw
        return torch.cat([family(n, gen) for _ in range(self.num_choices)])

    def sample_theta(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(self.num_choices, (n, 1), generator=generator, device=generator.device).float()

    def index(self, k: Tensor, theta: Tensor | None) -> Tensor:
        choice = self.theta_of(theta, len(k))[:, 0].to(device=k.device, dtype=torch.long)
        return choice * (self.K + 1) + k


@register_forward("random_choice_separable")
class RandomChoiceSeparable(RandomChoice):
    separable = True


@register_forward("random_rotation_product")
class RandomRotationProduct(MatrixProcess):
    """``T(k) = R_k ... R_1`` with orthogonal near-identity ``R_i`` (see :func:`rotation_products`).

    ``product_step`` sets how far each factor rotates (IHDM-style configs: 0.1). Its salt is the
    one the orthogonal product had when it was called ``random_product``, so its matrices are the same.
    """

    salt = 2
    config_keys = ("forward_seed", "product_step")

    def __init__(self, K: int, shape: tuple[int, int, int], forward_seed: int = 0, product_step: float = 0.1) -> None:
        self.step = float(product_step)
        super().__init__(K, shape, forward_seed)

    def build(self, n: int, gen: torch.Generator) -> Tensor:
        return stack_levels(rotation_products(self.K, n, gen, self.step), self.K + 1, n)


@register_forward("random_rotation_product_separable")
class RandomRotationProductSeparable(RandomRotationProduct):
    separable = True


@register_forward("random_product")
class RandomProduct(MatrixProcess):
    """The research notes' ``T(k) = R_k ... R_1``, Gaussian ``R_i`` (``N(0, 1/n)``, see :func:`gaussian_products`)."""

    salt = 3

    def build(self, n: int, gen: torch.Generator) -> Tensor:
        return stack_levels(gaussian_products(self.K, n, gen), self.K + 1, n)


@register_forward("random_product_separable")
class RandomProductSeparable(RandomProduct):
    """Per-axis Gaussian products: ``T(k) = I_C (x) (A_k ... A_1) (x) (B_k ... B_1)``."""

    separable = True
