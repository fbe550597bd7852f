"""This project's own forward processes: registered by name when the config imports this module."""

import torch

from lintrans.forward import ForwardProcess, register_forward


@register_forward("edge_decay")
class EdgeDecay(ForwardProcess):
    """``T(k) = diag(exp(-r k / K))``: every pixel decays at its own rate ``r``, 1 at the centre up to 4 in
    the corners, so the edges of an image fade first."""

    def __init__(self, K: int, shape: tuple[int, int, int]) -> None:
        super().__init__(K, shape)
        channels, height, width = shape
        y = torch.linspace(-1, 1, height).view(height, 1)
        x = torch.linspace(-1, 1, width).view(1, width)
        rate = 1 + 1.5 * (x**2 + y**2)
        self.register_buffer("rate", rate.expand(channels, height, width).contiguous(), persistent=False)

    @classmethod
    def storage_bytes(cls, K: int, shape: tuple[int, int, int], **params) -> int:
        return 4 * shape[0] * shape[1] * shape[2]  # one rate per pixel

    def forward(self, x: torch.Tensor, k: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:
        t = (k.float() / self.K).view(-1, 1, 1, 1)
        return x * torch.exp(-self.rate * t).to(x.dtype)

    def matrix(self, k: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        return torch.diag(torch.exp(-self.rate.double().flatten() * k / self.K))
