"""The denoiser: ResShift's Swin-UNet run in pixel space, laid out as the authors' release (DESIGN §1b).

The HR-size input ``x_t`` (already divided by ``diffusion.scale_input``) and the HR-size
condition ``[g(y), y]`` (or ``[y]`` for the baseline) are pixel-unshuffled by ``scale`` and
concatenated, so the UNet works at LR resolution; a nearest-neighbour upsampling head returns
the ``x_0`` estimate at HR size.

Module names and the state dict are those of the release's ``UNetModelSwin`` (every key, shape
and buffer, ``relative_position_index`` and ``attn_mask`` included), so its published weights
load strictly and a checkpoint of ours loads into its code. ``tests/data`` holds that layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from upsr.config import DenoiserConfig
from upsr.diffusion import DenoiseFn, UNWDiffusion

IMAGE_CHANNELS = 3
# Masked attention logits: the release's value (not -inf, so a fully masked row stays finite).
MASKED = -100.0


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps ``t`` (B,) -> (B, dim), cosines first."""
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


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (statistics of bf16/fp16 maps drift)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding entering as a scale and shift (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int, dropout: float):
        super().__init__()
        self.in_layers = nn.Sequential(
            GroupNorm32(groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        # The last conv starts at zero, so a fresh block is the identity (guided diffusion's choice).
        self.out_layers = nn.Sequential(
            GroupNorm32(groups, out_channels), nn.SiLU(), nn.Dropout(dropout),
            zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        scale, shift = self.emb_layers(emb).type(h.dtype)[:, :, None, None].chunk(2, dim=1)
        norm, rest = self.out_layers[0], self.out_layers[1:]
        h = rest(norm(h) * (1 + scale) + shift)
        return self.skip_connection(x) + h


def relative_position_index(window: int) -> torch.Tensor:
    """(N, N) index into a ((2w-1)^2, heads) bias table for the N = w*w tokens of a window, row-major."""
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return relative[..., 0] * (2 * window - 1) + relative[..., 1]


def partition_windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * H/w * W/w, w*w, C), windows image-major then row-major."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // window, window, w // window, window).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b * (h // window) * (w // window), window * window, c)


def merge_windows(windows: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(b, h // window, w // window, window, window, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, c, h, w)


def shifted_window_mask(height: int, width: int, window: int, shift: int, rule: str = "release") -> torch.Tensor:
    """(num_windows, N, N) additive mask for a map rolled by ``-shift``: tokens with different
    region labels do not attend to each other.

    ``rule="swin"`` is Swin's mask: tokens rolled in from the opposite border (bottom or right)
    do not see their new neighbours. ``rule="release"`` reproduces the mask the release computes
    (and stores in its checkpoints): it labels only bands of rows and reads each window's labels
    transposed, so in the bottom row of windows it separates the left and right parts of each
    window, and it masks nothing elsewhere.
    """
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    regions = torch.zeros(1, 1, height, width)
    if rule == "swin":
        for label, (rows, cols) in enumerate((r, c) for r in bands for c in bands):
            regions[:, :, rows, cols] = label
    else:
        for label, rows in enumerate(bands):
            regions[:, :, rows, :] = label
    windows = regions.view(height // window, window, width // window, window).permute(0, 2, 1, 3)
    if rule != "swin":
        windows = windows.transpose(2, 3)
    labels = windows.reshape(-1, window * window)
    return (labels[:, :, None] != labels[:, None, :]).float() * MASKED


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows with Swin's relative position bias."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.window = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent, as in the release: its checkpoints carry the index.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, windows: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``windows``: (num_windows * B, window**2, dim); ``mask``: (num_windows, N, N) additive or None."""
        batch, tokens, dim = windows.shape
        q, k, v = self.qkv(windows).view(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)[None]
        if mask is not None:
            # Materialised per image and window (as timm does): CUDA's fused attention kernels
            # take 4-D inputs only, and a 5-D broadcast would fall back to the unfused kernel.
            bias = (bias.view(1, 1, self.heads, tokens, tokens) + mask[None, :, None]).view(
                1, -1, self.heads, tokens, tokens
            )
            bias = bias.expand(batch // mask.shape[0], -1, -1, -1, -1).reshape(batch, self.heads, tokens, tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwinBlock(nn.Module):
    """Swin transformer block on NCHW maps, GroupNorm in place of LayerNorm (ResShift's choice).

    ``resolution`` is the side of the map the block is built for. As in the release, a block
    whose map is no larger than its window gets no shift, and the shifted blocks store the mask
    of that map (other sizes get theirs computed per call); ``mask_rule`` picks the mask
    (``shifted_window_mask``).
    """

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float, groups: int,
                 resolution: int, mask_rule: str = "release"):
        super().__init__()
        self.window = window
        self.shift = shift if resolution > window else 0
        self.resolution = resolution
        self.mask_rule = mask_rule
        self.norm1 = GroupNorm32(groups, dim)
        self.attn = WindowAttention(dim, heads, window)
        self.norm2 = GroupNorm32(groups, dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        mask = shifted_window_mask(resolution, resolution, window, self.shift, mask_rule) if self.shift else None
        self.register_buffer("attn_mask", mask)

    def _mask(self, height: int, width: int, device: torch.device) -> torch.Tensor | None:
        if not self.shift:
            return None
        if height == width == self.resolution:
            return self.attn_mask
        return shifted_window_mask(height, width, self.window, self.shift, self.mask_rule).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % self.window or w % self.window:
            raise ValueError(f"feature map {h}x{w} is not a multiple of the Swin window {self.window}; "
                             "pad the LR image to DenoiserConfig.lr_multiple")
        shifted = self.norm1(x)
        if self.shift:
            shifted = torch.roll(shifted, (-self.shift, -self.shift), dims=(2, 3))
        attended = self.attn(partition_windows(shifted, self.window), self._mask(h, w, x.device))
        attended = merge_windows(attended, self.window, b, h, w)
        if self.shift:
            attended = torch.roll(attended, (self.shift, self.shift), dims=(2, 3))
        x = x + attended
        return x + self.mlp(self.norm2(x))


class PointwiseProjection(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class SwinLayer(nn.Module):
    """1x1 conv to the Swin width, blocks alternating plain and half-window-shifted, 1x1 conv back."""

    def __init__(self, channels: int, config: DenoiserConfig, resolution: int):
        super().__init__()
        self.patch_embed = PointwiseProjection(channels, config.swin_dim)
        self.blocks = nn.ModuleList(
            SwinBlock(config.swin_dim, config.swin_heads, config.window_size,
                      shift=config.window_size // 2 if index % 2 else 0,
                      mlp_ratio=config.mlp_ratio, groups=config.norm_groups, resolution=resolution,
                      mask_rule=config.shift_mask)
            for index in range(config.swin_depth)
        )
        self.patch_unembed = PointwiseProjection(config.swin_dim, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return self.patch_unembed(x)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepSequential(nn.Sequential):
    """Runs its layers in order, handing the time embedding to the res-blocks."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class SwinUNetDenoiser(nn.Module):
    """``denoiser(x_t_scaled, t, cond) -> x0_hat``, all three images at HR size in [-1, 1] scale."""

    def __init__(self, config: DenoiserConfig):
        super().__init__()
        self.config = config
        mc = config.model_channels
        emb_dim = 4 * mc
        cond_images = 2 if config.use_sr_condition else 1
        in_channels = IMAGE_CHANNELS * config.scale**2 * (1 + cond_images)

        def res_block(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, config.norm_groups, config.dropout)

        self.unshuffle = nn.PixelUnshuffle(config.scale)
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        # Encoder: the channel count of every skip connection, in push order.
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(in_channels, mc, 3, padding=1))])
        skip_channels = [mc]
        channels = mc
        resolution = config.image_size
        last_level = len(config.channel_mult) - 1
        for level, mult in enumerate(config.channel_mult):
            for index in range(config.num_res_blocks):
                out = mc * mult
                layers: list[nn.Module] = [res_block(channels, out)]
                if index == 0:
                    layers.append(SwinLayer(out, config, resolution))
                self.input_blocks.append(TimestepSequential(*layers))
                channels = out
                skip_channels.append(channels)
            if level != last_level:
                self.input_blocks.append(TimestepSequential(Downsample(channels)))
                skip_channels.append(channels)
                resolution //= 2

        self.middle_block = TimestepSequential(
            res_block(channels, channels), SwinLayer(channels, config, resolution), res_block(channels, channels)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            for index in range(config.num_res_blocks + 1):
                out = mc * mult
                layers = [res_block(channels + skip_channels.pop(), out)]
                if index == 0:
                    layers.append(SwinLayer(out, config, resolution))
                if level and index == config.num_res_blocks:
                    layers.append(Upsample(out))
                    resolution *= 2
                self.output_blocks.append(TimestepSequential(*layers))
                channels = out

        # The x4 head: two rounds of nearest x2 and conv (DESIGN §1b).
        head = config.head_channels
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(channels, head, 3, padding=1), nn.LeakyReLU(inplace=True))
        self.conv_up1 = nn.Conv2d(head, head, 3, padding=1)
        self.conv_up2 = nn.Conv2d(head, head, 3, padding=1)
        self.conv_hr = nn.Conv2d(head, head, 3, padding=1)
        self.conv_last = nn.Conv2d(head, IMAGE_CHANNELS, 3, padding=1)
        if config.predict == "residual":
            zero_init(self.conv_last)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)
        self.activation_checkpointing = False

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every block of the encoder, middle and decoder in the backward pass instead of
        storing its activations (the gradients are the same; dropout replays its random draws)."""
        self.activation_checkpointing = enabled

    def _run(self, block: TimestepSequential, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, emb, use_reentrant=False)
        return block(h, emb)

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
        # Unshuffling the concatenation keeps the release's channel order: x_t's 48, then g(y)'s, then y's.
        h = self.unshuffle(torch.cat([x_t_scaled, cond], dim=1))
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            h = self._run(block, torch.cat([h, skips.pop()], dim=1), emb)
        h = self.conv_before_upsample(h)
        h = self.lrelu(self.conv_up1(F.interpolate(h, scale_factor=2, mode="nearest")))
        h = self.lrelu(self.conv_up2(F.interpolate(h, scale_factor=2, mode="nearest")))
        out = self.conv_last(self.lrelu(self.conv_hr(h)))
        return out + cond[:, :IMAGE_CHANNELS] if self.config.predict == "residual" else out


def build_denoiser(config: DenoiserConfig) -> SwinUNetDenoiser:
    return SwinUNetDenoiser(config)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_denoise_fn(denoiser: nn.Module, diffusion: UNWDiffusion) -> DenoiseFn:
    """Adapter for ``UNWDiffusion.sample``: raw ``x_t`` in, the denoiser sees it scaled."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return diffusion.denoise(denoiser, x_t, t, cond)

    return denoise
