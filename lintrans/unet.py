"""The IHDM U-Net (the guided-diffusion architecture IHDM uses), conditioned on the level k.

``UNet(**model_args)(u_k, k, theta)`` predicts the residual ``f`` with ``u_{k-1} ~ u_k + f``
(:func:`lintrans.config.model_args` reads the arguments from ``config.model``). ``theta`` is the
per-sample parameter of a stochastic forward process (``None`` for a deterministic one); with
``theta_dim > 0`` it is embedded like the level (sinusoids of each component, an MLP) and added to
the level embedding, with ``theta_dim = 0`` it is ignored, so every caller calls the network the
same way.
``attention_levels`` are indices into ``channel_mult`` (IHDM's convention). Normalisation is
GroupNorm and the non-linearity swish (SiLU), as in every IHDM config. ResBlocks return
``skip(x) + h`` as IHDM's do; ``rescale_resblocks=True`` is the variant that divides that sum by
``sqrt(2)`` (score-SDE's ``skip_rescale``, a key IHDM's configs set but its U-Net never reads).

By default the network computes IHDM's ``UNetModel`` function exactly (checked against IHDM's own
outputs in ``tests/test_ihdm_import.py``); only the module names differ, and
:mod:`lintrans.ihdm_checkpoint` maps IHDM's names (``time_embed``, ``input_blocks``,
``middle_block``, ``output_blocks``, ``out``) onto these. Where IHDM would fail (an odd size
before a downsampling), upsampling here restores the skip connection's size instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lintrans.errors import UsageError


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows it (guided-diffusion's choice)."""
    return nn.GroupNorm(math.gcd(32, channels), channels)


def level_embedding(k: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of the (integer) level, ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=k.device) / half)
    args = k.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def theta_embedding(theta: Tensor, dim: int) -> Tensor:
    """:func:`level_embedding` of each component of ``theta (B, theta_dim)``, concatenated: ``(B, theta_dim*dim)``."""
    return level_embedding(theta.reshape(-1), dim).reshape(len(theta), -1)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch, so every block starts as identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        emb_dim: int,
        dropout: float,
        scale_shift: bool,
        rescale: bool,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.rescale = rescale
        self.in_layers = nn.Sequential(group_norm(in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch))
        self.out_norm = group_norm(out_ch)
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        )
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers(x)
        e = self.emb(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.skip(x) + self.out_layers(h)
        return h / math.sqrt(2.0) if self.rescale else h


class AttentionBlock(nn.Module):
    """Self-attention over pixels with fused scaled-dot-product attention."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int) -> None:
        super().__init__()
        self.heads = channels // num_head_channels if num_head_channels > 0 else num_heads
        if channels % self.heads:
            raise UsageError(f"attention: {channels} channels do not split into {self.heads} heads")
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        # Token-major: the 1x1 convolutions are matmuls over (B, HW, C) tokens, so q, k and v come out of
        # one matmul as views with unit stride in the last dimension, which SDPA's fused CPU kernel takes
        # as they are (in every precision and mode), and the residual sum reads the projection transposed.
        # The channel-major form copied q, k, v transposed (3x the tokens' size) and the attention's
        # output; now the matmul copies only the tokens. Same weights; the mnist5k U-Net's inference ran
        # 1.04-1.07x as fast at batch 100, its training step 1.03-1.09x, default_mnist's fp32 step
        # (on the math path before) 0.98-1.00x (README, "Performance").
        B, C, H, W = x.shape
        tokens = self.norm(x).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C), a transposed view
        qkv = F.linear(tokens, self.qkv.weight.squeeze(-1), self.qkv.bias)  # (B, HW, 3C)
        q, k, v = qkv.unflatten(-1, (3, self.heads, C // self.heads)).permute(2, 0, 3, 1, 4)  # (B, heads, HW, C/h)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        out = F.linear(h, self.proj.weight.squeeze(-1), self.proj.bias).transpose(1, 2)  # (B, C, HW), a view
        return x + out.reshape(B, C, H, W)  # contiguous like x: the sum takes x's layout


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def _down_path(
    ch: int, channel_mult: tuple[int, ...], num_res_blocks: int, attention_levels: tuple[int, ...],
    conv_resample: bool, res: Callable[[int, int], ResBlock], attn: Callable[[int], AttentionBlock],
) -> tuple[nn.ModuleList, list[int]]:  # fmt: skip
    """The encoder's blocks, level by level, and the channels of every skip connection (input conv's first)."""
    down, cur = nn.ModuleList(), channel_mult[0] * ch
    skips = [cur]
    for level, mult in enumerate(channel_mult):
        for _ in range(num_res_blocks):
            layers = [res(cur, mult * ch)]
            cur = mult * ch
            if level in attention_levels:
                layers.append(attn(cur))
            down.append(nn.ModuleList(layers))
            skips.append(cur)
        if level != len(channel_mult) - 1:
            down.append(nn.ModuleList([Downsample(cur, conv_resample)]))
            skips.append(cur)
    return down, skips


def _up_path(
    ch: int, channel_mult: tuple[int, ...], num_res_blocks: int, attention_levels: tuple[int, ...],
    conv_resample: bool, res: Callable[[int, int], ResBlock], attn: Callable[[int], AttentionBlock],
    skips: list[int],
) -> tuple[nn.ModuleList, nn.ModuleDict]:  # fmt: skip
    """The decoder's blocks (each takes a skip, popped from ``skips``) and its upsamplers, keyed by block index."""
    up, upsamplers, cur = nn.ModuleList(), nn.ModuleDict(), skips[-1]
    for level, mult in reversed(list(enumerate(channel_mult))):
        for i in range(num_res_blocks + 1):
            layers = [res(cur + skips.pop(), mult * ch)]
            cur = mult * ch
            if level in attention_levels:
                layers.append(attn(cur))
            up.append(nn.ModuleList(layers))
            if level and i == num_res_blocks:
                upsamplers[str(len(up) - 1)] = Upsample(cur, conv_resample)
    return up, upsamplers


class UNet(nn.Module):
    def __init__(
        self,
        *,
        in_channels: int,
        model_channels: int,
        channel_mult: tuple[int, ...],
        num_res_blocks: int,
        attention_levels: tuple[int, ...],
        dropout: float = 0.0,
        use_scale_shift_norm: bool = False,
        conv_resample: bool = True,
        num_heads: int = 1,
        num_head_channels: int = -1,
        rescale_resblocks: bool = False,
        theta_dim: int = 0,
    ) -> None:
        super().__init__()
        ch = model_channels
        emb_dim = 4 * ch
        bad = [lvl for lvl in attention_levels if not 0 <= lvl < len(channel_mult)]
        if bad:
            raise UsageError(
                f"config.model.attention_levels {tuple(attention_levels)}: levels {bad} do not exist; "
                f"valid: 0..{len(channel_mult) - 1} (indices into channel_mult {tuple(channel_mult)})"
            )
        self.model_channels = ch
        self.level_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.theta_mlp = (
            nn.Sequential(nn.Linear(theta_dim * ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if theta_dim
            else None
        )

        def res(i: int, o: int) -> ResBlock:
            return ResBlock(i, o, emb_dim, dropout, use_scale_shift_norm, rescale_resblocks)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, num_head_channels)

        # IHDM's (guided-diffusion's) first convolution is channel_mult[0] * model_channels wide.
        self.input_conv = nn.Conv2d(in_channels, channel_mult[0] * ch, 3, padding=1)
        self.down, skips = _down_path(ch, channel_mult, num_res_blocks, attention_levels, conv_resample, res, attn)
        cur = skips[-1]
        self.middle = nn.ModuleList([res(cur, cur), attn(cur), res(cur, cur)])
        self.up, self.upsamplers = _up_path(ch, channel_mult, num_res_blocks, attention_levels, conv_resample, res,
                                            attn, skips)  # fmt: skip
        cur = channel_mult[0] * ch
        self.out = nn.Sequential(group_norm(cur), nn.SiLU(), zero_module(nn.Conv2d(cur, in_channels, 3, padding=1)))

    def read_image(self, x: Tensor) -> Tensor:
        """The first convolution, on the image in its own precision even under bf16 autocast.

        Autocast would round ``x`` to bf16 (8 bits of mantissa: steps of 2^-8 near 1), the order of the
        noise level σ = 0.01, and the network then cannot see what the ELBO measures it on: on mnist5k
        models that rounding was up to half of the bf16 network's ELBO error (README, "Precision"). Spread
        over the output's channels, the image survives the rounding of this convolution's output to bf16.
        """
        device = x.device.type
        with torch.autocast(device, enabled=False):
            h = self.input_conv(x)
        return h.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else h

    def forward(self, x: Tensor, k: Tensor, theta: Tensor | None = None) -> Tensor:
        emb = self.level_mlp(level_embedding(k, self.model_channels))
        if self.theta_mlp is not None:
            if theta is None:
                raise UsageError("this network is conditioned on theta (config.model.condition_on_theta) but got none")
            emb = emb + self.theta_mlp(theta_embedding(theta, self.model_channels))
        h = self.read_image(x)
        hs = [h]
        for layers in self.down:
            for layer in layers:
                h = layer(h, emb)
            hs.append(h)
        for layer in self.middle:
            h = layer(h, emb)
        for idx, layers in enumerate(self.up):
            h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h, emb)
            up = self.upsamplers[str(idx)] if str(idx) in self.upsamplers else None
            if up is not None:
                h = up(h, hs[-1].shape[-2:])
        return self.out(h)
