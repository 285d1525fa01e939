"""The denoiser: ResShift's Swin-UNet run in pixel space (DESIGN §1).

The HR-size input ``x_t`` (already divided by ``diffusion.scale_input``) and the HR-size
condition ``[g(y), y]`` (or ``[y]`` for the baseline) are pixel-unshuffled by ``scale`` and
concatenated, so the UNet works at LR resolution; a small nearest-neighbour upsampling head
returns the ``x_0`` estimate at HR size.
"""

from __future__ import annotations

import math
import torch
import torch.nn.functional as F
from torch import nn

from upsr.config import DenoiserConfig
from upsr.diffusion import DenoiseFn, UNWDiffusion

IMAGE_CHANNELS = 3


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps ``t`` (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


def zero_init(module: nn.Module) -> nn.Module:
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding entering as a scale and shift (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.out_norm = nn.GroupNorm(groups, out_channels)
        # Zero-initialised so that every block starts as the identity (guided-diffusion's choice).
        self.out_layers = nn.Sequential(
            nn.SiLU(), nn.Dropout(dropout), zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.out_layers(self.out_norm(h) * (1 + scale) + shift)
        return self.skip(x) + h


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with Swin's relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
        self.register_buffer("bias_index", relative[..., 0] * (2 * window - 1) + relative[..., 1], persistent=False)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``windows``: (num_windows * B, window**2, dim); ``mask``: (num_windows, N, N) additive or None."""
        batch, tokens, dim = windows.shape
        q, k, v = self.qkv(windows).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias[self.bias_index].permute(2, 0, 1)[None]  # (1, heads, N, N)
        if mask is not None:
            # Materialised per image and window (as timm does): CUDA's fused attention kernels
            # take 4-D inputs only, and a 5-D broadcast would fall back to the unfused kernel.
            bias = (bias.view(1, 1, self.heads, tokens, tokens) + mask[None, :, None]).view(
                1, -1, self.heads, tokens, tokens
            )
            bias = bias.expand(batch // mask.shape[0], -1, -1, -1, -1).reshape(batch, self.heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class SwinBlock(nn.Module):
    """Swin transformer block on NCHW maps, GroupNorm in place of LayerNorm (ResShift's choice)."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, groups: int):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.GroupNorm(groups, dim)
        self.attention = WindowAttention(dim, heads, window)
        self.norm2 = nn.GroupNorm(groups, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))

    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        # Tokens rolled in from the opposite border must not attend to their new neighbours.
        regions = torch.zeros(height, width, device=device)
        bounds = (slice(0, -self.window), slice(-self.window, -self.shift), slice(-self.shift, None))
        for label, (rows, cols) in enumerate((r, c) for r in bounds for c in bounds):
            regions[rows, cols] = label
        labels = self._partition(regions[None, None]).squeeze(-1)  # (num_windows, N)
        return (labels[:, :, None] != labels[:, None, :]).float() * -100.0

    def _partition(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.window
        x = x.view(b, c, h // n, n, w // n, n).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(b * (h // n) * (w // n), n * n, c)

    def _merge(self, windows: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
        n = self.window
        c = windows.shape[-1]
        x = windows.view(b, h // n, w // n, n, n, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, c, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % self.window or w % self.window:
            raise ValueError(f"feature map {h}x{w} is not a multiple of the Swin window {self.window}; "
                             "pad the LR image to DenoiserConfig.lr_multiple")
        shifted = self.norm1(x)
        mask = None
        if self.shift:
            shifted = torch.roll(shifted, (-self.shift, -self.shift), dims=(2, 3))
            mask = self._shift_mask(h, w, x.device)
        attended = self._merge(self.attention(self._partition(shifted), mask), b, h, w)
        if self.shift:
            attended = torch.roll(attended, (self.shift, self.shift), dims=(2, 3))
        x = x + attended
        return x + self.mlp(self.norm2(x))


class SwinLayer(nn.Module):
    """1x1 conv to the Swin width, blocks alternating plain and half-window-shifted, 1x1 conv back."""

    def __init__(self, channels: int, config: DenoiserConfig):
        super().__init__()
        self.embed = nn.Conv2d(channels, config.swin_dim, 1)
        self.blocks = nn.Sequential(*(
            SwinBlock(config.swin_dim, config.swin_heads, config.window_size,
                      shift=config.window_size // 2 if index % 2 else 0,
                      mlp_ratio=config.mlp_ratio, groups=config.norm_groups)
            for index in range(config.swin_depth)
        ))
        self.unembed = nn.Conv2d(config.swin_dim, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unembed(self.blocks(self.embed(x)))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Stage(nn.Module):
    """One UNet step: a res-block, optionally followed by a Swin layer and a resampler."""

    def __init__(self, block: ResBlock, swin: SwinLayer | None = None, resample: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.swin = swin
        self.resample = resample

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = self.block(x, emb)
        if self.swin is not None:
            x = self.swin(x)
        if self.resample is not None:
            x = self.resample(x)
        return x


class SwinUNetDenoiser(nn.Module):
    """``denoiser(x_t_scaled, t, cond) -> x0_hat``, all three images at HR size in [-1, 1] scale."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = 4 * mc
        groups = config.norm_groups
        unshuffled = IMAGE_CHANNELS * config.scale**2
        cond_images = 2 if config.use_sr_condition else 1
        in_channels = unshuffled * (1 + cond_images)

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, groups, config.dropout)

        self.unshuffle = nn.PixelUnshuffle(config.scale)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(in_channels, mc, 3, padding=1)

        # Encoder: the channel count of every skip connection, in push order.
        skip_channels = [mc]
        channels = mc
        self.encoder = nn.ModuleList()
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for index in range(config.num_res_blocks):
                out = mc * mult
                swin = SwinLayer(out, config) if index == 0 else None
                self.encoder.append(Stage(res_block(channels, out), swin))
                channels = out
                skip_channels.append(channels)
            if level != last_level:
                self.encoder.append(Downsample(channels))
                skip_channels.append(channels)

        self.middle = nn.ModuleList([
            Stage(res_block(channels, channels), SwinLayer(channels, config)),
            Stage(res_block(channels, channels)),
        ])

        self.decoder = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                out = mc * mult
                swin = SwinLayer(out, config) if index == 0 else None
                upsample = Upsample(out) if level and index == config.num_res_blocks else None
                self.decoder.append(Stage(res_block(channels + skip_channels.pop(), out), swin, upsample))
                channels = out

        head = config.head_channels
        rounds = int(math.log2(config.scale))
        layers: list[nn.Module] = [nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, head, 3, padding=1)]
        for _ in range(rounds):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(head, head, 3, padding=1),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(head, head, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
                   zero_init(nn.Conv2d(head, IMAGE_CHANNELS, 3, padding=1))]
        self.head = nn.Sequential(*layers)

    @property
    def lr_multiple(self) -> int:
        return self.config.lr_multiple

    @property
    def use_sr_condition(self) -> bool:
        return self.config.use_sr_condition

    def forward(self, x_t_scaled: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        expected = IMAGE_CHANNELS * (2 if self.config.use_sr_condition else 1)
        if cond.shape[1] != expected or cond.shape[2:] != x_t_scaled.shape[2:]:
            raise ValueError(f"cond must be {expected}x{x_t_scaled.shape[2]}x{x_t_scaled.shape[3]} "
                             f"(use_sr_condition={self.config.use_sr_condition}), got {tuple(cond.shape[1:])}")
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels))
        h = self.input_conv(self.unshuffle(torch.cat([x_t_scaled, cond], dim=1)))
        skips = [h]
        for stage in self.encoder:
            h = stage(h, emb) if isinstance(stage, Stage) else stage(h)
            skips.append(h)
        for stage in self.middle:
            h = stage(h, emb)
        for stage in self.decoder:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.head(h)


def build_denoiser(config: DenoiserConfig) -> SwinUNetDenoiser:
    return SwinUNetDenoiser(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_denoise_fn(denoiser: nn.Module, diffusion: UNWDiffusion) -> DenoiseFn:
    """Adapter for ``UNWDiffusion.sample``: raw ``x_t`` in, the denoiser sees it scaled."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return denoiser(diffusion.scale_input(x_t, t), t, cond)

    return denoise
