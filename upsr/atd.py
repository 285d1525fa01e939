"""ATD (Adaptive Token Dictionary SR transformer), the variant the UPSR release uses as its aux net g.

The release's ``atd_real_arch.py`` differs from the ATD that spandrel and the ATD authors ship:
every residual group normalises its output tokens with a LayerNorm (``layers.N.patch_embed.norm``),
the input is mapped to [-1, 1] inside the net, and odd sizes are padded by mirroring. spandrel
0.4.2 refuses the release's state dict and, with those norms added, computes something else
(DESIGN §1b), so this module builds that variant: the same state-dict keys and shapes, the same
numbers. Its ``forward`` takes LR in [0, 1] and returns SR in [0, 1] (not clamped).

Every layer mixes three attentions of the LayerNormed tokens, averaged with weight 1/sqrt(3):
(shifted) window self-attention, cross-attention to a learned token dictionary (refined from
layer to layer), and self-attention among the tokens that share a dictionary entry (AC-MSA).

The class is registered in basicsr's ``ARCH_REGISTRY`` as "ATD", so ``aux.arch: ATD`` with the
release's ``network_mse`` options builds it like any basicsr architecture.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import basicsr_compat  # noqa: F401  (must precede basicsr)
from basicsr.utils.registry import ARCH_REGISTRY

from upsr.denoiser import relative_position_index, shifted_window_mask


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(b, h, w, c) -> (b * h/window * w/window, window*window, c), row-major windows and tokens."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_merge(windows: torch.Tensor, window: int, b: int, h: int, w: int) -> torch.Tensor:
    x = windows.view(b, h // window, w // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, -1)


class WindowAttention(nn.Module):
    """Window self-attention on precomputed q, k, v with a relative position bias."""

    def __init__(self, dim: int, window: int, heads: int):
        super().__init__()
        self.window = window
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.proj = nn.Linear(dim, dim)

    def forward(self, qkv: torch.Tensor, position_index: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, tokens, dim3 = qkv.shape
        dim = dim3 // 3
        q, k, v = qkv.reshape(batch, tokens, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        attention = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[position_index.view(-1)].view(tokens, tokens, -1)
        attention = attention + bias.permute(2, 0, 1)[None]
        if mask is not None:
            windows = mask.shape[0]
            attention = attention.view(batch // windows, windows, self.heads, tokens, tokens) + mask[None, :, None]
            attention = attention.view(-1, self.heads, tokens, tokens)
        out = (attention.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class TokenDictionaryAttention(nn.Module):
    """Cross-attention from the image tokens to the token dictionary (cosine similarity, learned
    per-entry temperature); also returns the similarity map that AC-MSA groups by."""

    def __init__(self, dim: int, num_tokens: int, reduced_dim: int):
        super().__init__()
        self.num_tokens = num_tokens
        self.wq = nn.Linear(dim, reduced_dim)
        self.wk = nn.Linear(dim, reduced_dim)
        self.wv = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.ones(num_tokens) * 0.5)

    def forward(self, x: torch.Tensor, dictionary: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        similarity = F.normalize(self.wq(x), dim=-1) @ F.normalize(self.wk(dictionary), dim=-1).transpose(-2, -1)
        similarity = similarity * (1 + self.scale.clamp(0, 1) * math.log(self.num_tokens))
        similarity = similarity.softmax(dim=-1)
        return similarity @ self.wv(dictionary), similarity


def inverse_permutation(order: torch.Tensor) -> torch.Tensor:
    """Per row of ``order`` (b, n): the permutation that undoes it."""
    positions = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    return torch.zeros_like(order).scatter_(-1, order, positions)


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 1, order[..., None].expand(-1, -1, x.shape[-1]))


class CategoryAttention(nn.Module):
    """AC-MSA: tokens sorted by their most similar dictionary entry, cut into groups of
    ``category_size`` and attending within their group (cosine-free, learned logit scale)."""

    def __init__(self, dim: int, heads: int, category_size: int):
        super().__init__()
        self.heads = heads
        self.category_size = category_size
        self.proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(1, 1)))

    def forward(self, qkv: torch.Tensor, similarity: torch.Tensor) -> torch.Tensor:
        b, n, dim3 = qkv.shape
        dim = dim3 // 3
        group = min(n, self.category_size)
        groups = (n + group - 1) // group
        # The release sorts with stable=False: tokens tied on their category are ordered as the
        # device's sort leaves them, and that order changes which tokens share a group.
        _, order = torch.sort(similarity.argmax(dim=-1), dim=-1, stable=False)
        sorted_qkv = gather_tokens(qkv, order)
        pad = groups * group - n
        # The last group is filled with the sequence's own tail, mirrored.
        padded = torch.cat([sorted_qkv, torch.flip(sorted_qkv[:, n - pad:n, :], dims=[1])], dim=1)
        q, k, v = padded.reshape(b, groups, group, 3, self.heads, dim // self.heads).permute(3, 0, 1, 4, 2, 5)
        logit_scale = self.logit_scale.clamp(max=math.log(1 / 0.01)).exp()
        attention = ((q @ k.transpose(-2, -1)) * logit_scale).softmax(dim=-1)
        y = (attention @ v).permute(0, 1, 3, 2, 4).reshape(b, n + pad, dim)[:, :n, :]
        return self.proj(gather_tokens(y, inverse_permutation(order)))


class DepthwiseConv(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.depthwise_conv = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels), nn.GELU()
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        # A contiguous NCHW map, as the release feeds its conv: the layout picks the kernel,
        # whose rounding can flip a later argmax over the token dictionary.
        y = self.depthwise_conv(x.transpose(1, 2).reshape(b, c, *size).contiguous())
        return y.flatten(2).transpose(1, 2).contiguous()


class ConvFFN(nn.Module):
    def __init__(self, dim: int, hidden: int, kernel_size: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.dwconv = DepthwiseConv(hidden, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.act(self.fc1(x))
        return self.fc2(x + self.dwconv(x, size))


class ATDLayer(nn.Module):
    """One transformer layer; all but a group's last layer also refine the token dictionary."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, category_size: int, num_tokens: int,
                 reduced_dim: int, ffn_kernel_size: int, mlp_ratio: float, refines_dictionary: bool):
        super().__init__()
        self.window = window
        self.shift = shift
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        if refines_dictionary:
            self.norm3 = nn.InstanceNorm1d(num_tokens, affine=True)
            self.sigma = nn.Parameter(torch.zeros(num_tokens, 1))
        self.refines_dictionary = refines_dictionary
        self.wqkv = nn.Linear(dim, 3 * dim)
        self.attn_win = WindowAttention(dim, window, heads)
        self.attn_atd = TokenDictionaryAttention(dim, num_tokens, reduced_dim)
        self.attn_aca = CategoryAttention(dim, heads, category_size)
        self.convffn = ConvFFN(dim, int(dim * mlp_ratio), ffn_kernel_size)

    def forward(self, x: torch.Tensor, dictionary: torch.Tensor, size: tuple[int, int], position_index: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = size
        b, n, c = x.shape
        normed = self.norm1(x)
        qkv = self.wqkv(normed)
        x_dictionary, similarity = self.attn_atd(normed, dictionary)
        x_category = self.attn_aca(qkv, similarity)
        qkv_map = qkv.reshape(b, h, w, 3 * c)
        if self.shift:
            qkv_map = torch.roll(qkv_map, (-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn_win(window_partition(qkv_map, self.window), position_index, mask if self.shift else None)
        x_window = window_merge(windows, self.window, b, h, w)
        if self.shift:
            x_window = torch.roll(x_window, (self.shift, self.shift), dims=(1, 2))
        x = x + (x_window.reshape(b, n, c) + x_dictionary + x_category) / math.sqrt(3)
        x = x + self.convffn(self.norm2(x), size)
        if self.refines_dictionary:
            assignment = self.norm3(similarity.transpose(-1, -2)).softmax(dim=-1)
            keep = torch.sigmoid(self.sigma)
            dictionary = keep * dictionary + (1 - keep) * torch.einsum("btn,bnc->btc", assignment, x)
        return x, dictionary


class ResidualGroup(nn.Module):
    """Layers alternating plain and half-window-shifted attention, sharing one token dictionary."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, category_size: int, num_tokens: int,
                 reduced_dim: int, ffn_kernel_size: int, mlp_ratio: float, use_checkpoint: bool):
        super().__init__()
        self.use_checkpoint = use_checkpoint
        self.layers = nn.ModuleList(
            ATDLayer(dim, heads, window, 0 if index % 2 == 0 else window // 2, category_size, num_tokens,
                     reduced_dim, ffn_kernel_size, mlp_ratio, refines_dictionary=index < depth - 1)
            for index in range(depth)
        )
        self.td = nn.Parameter(torch.randn(num_tokens, dim))

    def forward(self, x: torch.Tensor, size: tuple[int, int], position_index: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        dictionary = self.td.repeat(x.shape[0], 1, 1)
        for layer in self.layers:
            dictionary = F.normalize(dictionary, dim=-1)
            if self.use_checkpoint and self.training:
                x, dictionary = torch.utils.checkpoint.checkpoint(
                    layer, x, dictionary, size, position_index, mask, use_reentrant=False)
            else:
                x, dictionary = layer(x, dictionary, size, position_index, mask)
        return x


class TokenNorm(nn.Module):
    """A LayerNorm over the channels of a token sequence (the release's ``patch_embed.norm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x)


class ATDBlock(nn.Module):
    """A residual group, a 3x3 conv on the map, the release's LayerNorm on the tokens, plus the input."""

    def __init__(self, dim: int, resi_connection: str, **group_options):
        super().__init__()
        self.residual_group = ResidualGroup(dim, **group_options)
        self.conv = residual_conv(dim, resi_connection)
        self.patch_embed = TokenNorm(dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int], position_index: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        y = self.residual_group(x, size, position_index, mask)
        y = self.conv(tokens_to_map(y, size))
        return self.patch_embed(y.flatten(2).transpose(1, 2)) + x


def tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size)


def residual_conv(dim: int, kind: str) -> nn.Module:
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, padding=1)
    if kind == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, padding=1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {kind!r}")


class PixelShuffleUpsampler(nn.Sequential):
    """(conv to 4x channels, pixel shuffle x2) per factor of 2."""

    def __init__(self, scale: int, channels: int):
        layers: list[nn.Module] = []
        for _ in range(int(math.log2(scale))):
            layers += [nn.Conv2d(channels, 4 * channels, 3, padding=1), nn.PixelShuffle(2)]
        super().__init__(*layers)


@ARCH_REGISTRY.register()
class ATD(nn.Module):
    """The release's ATD: LR in [0, 1] of any size -> x``upscale`` SR in [0, 1] (not clamped).

    The keyword arguments are those of the release's ``network_mse.params``; ``img_size`` and
    ``img_range`` are accepted for that file's sake and change nothing (the release ignores them
    in its forward pass too).
    """

    def __init__(self, upscale: int = 4, in_chans: int = 3, img_size: int = 64, embed_dim: int = 96,
                 depths: Sequence[int] = (6, 6, 6, 6), num_heads: Sequence[int] = (4, 4, 4, 4),
                 window_size: int = 16, category_size: int = 128, num_tokens: int = 64, reducted_dim: int = 8,
                 convffn_kernel_size: int = 7, mlp_ratio: float = 1.0, img_range: float = 1.0,
                 upsampler: str = "pixelshuffledirect", resi_connection: str = "1conv",
                 use_checkpoint: bool = False):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"depths ({list(depths)}) and num_heads ({list(num_heads)}) differ in length")
        if upscale < 2 or upscale & (upscale - 1):
            raise ValueError(f"upscale must be a power of two >= 2, got {upscale}")
        if any(embed_dim % heads for heads in num_heads):
            raise ValueError(f"embed_dim {embed_dim} is not divisible by every num_heads {list(num_heads)}")
        self.upscale = upscale
        self.window_size = window_size
        self.upsampler = upsampler
        self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, padding=1)
        self.patch_embed = TokenNorm(embed_dim)
        self.register_buffer("relative_position_index_SA", relative_position_index(window_size))
        self.layers = nn.ModuleList(
            ATDBlock(embed_dim, resi_connection, depth=depth, heads=heads, window=window_size,
                     category_size=category_size, num_tokens=num_tokens, reduced_dim=reducted_dim,
                     ffn_kernel_size=convffn_kernel_size, mlp_ratio=mlp_ratio, use_checkpoint=use_checkpoint)
            for depth, heads in zip(depths, num_heads)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)
        if upsampler == "pixelshuffledirect":
            self.upsample = nn.Sequential(nn.Conv2d(embed_dim, upscale**2 * in_chans, 3, padding=1),
                                          nn.PixelShuffle(upscale))
        elif upsampler == "pixelshuffle":
            features = 64
            self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, features, 3, padding=1),
                                                      nn.LeakyReLU(inplace=True))
            self.upsample = PixelShuffleUpsampler(upscale, features)
            self.conv_last = nn.Conv2d(features, in_chans, 3, padding=1)
        else:
            raise ValueError(f"upsampler must be 'pixelshuffledirect' or 'pixelshuffle', got {upsampler!r}")
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, lr: torch.Tensor) -> torch.Tensor:
        height, width = lr.shape[-2:]
        padded_h = -(-height // self.window_size) * self.window_size
        padded_w = -(-width // self.window_size) * self.window_size
        # Mirror padding that repeats the border pixel (not reflect), as the release pads.
        x = torch.cat([lr, torch.flip(lr, [2])], 2)[:, :, :padded_h, :]
        x = torch.cat([x, torch.flip(x, [3])], 3)[:, :, :, :padded_w]
        x = self.conv_first((x - 0.5) / 0.5)
        size = (padded_h, padded_w)
        # Swin's own mask here: the release's ATD computes it correctly (unlike its denoiser).
        mask = shifted_window_mask(padded_h, padded_w, self.window_size, self.window_size // 2, "swin").to(x.device)
        tokens = self.patch_embed(x.flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, size, self.relative_position_index_SA, mask)
        x = self.conv_after_body(tokens_to_map(self.norm(tokens), size)) + x
        if self.upsampler == "pixelshuffledirect":
            x = self.upsample(x)
        else:
            x = self.conv_last(self.upsample(self.conv_before_upsample(x)))
        return (x * 0.5 + 0.5)[..., : height * self.upscale, : width * self.upscale]
