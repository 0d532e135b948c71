"""A plain reference copy of ddpm_lib.UNet, for checking and benchmarking the library's model.

This is the course report's U-Net (32→64→128→128 channels, attention at the bottleneck) written
the way the report's code was: float32, NCHW, `nn.MultiheadAttention` at the bottleneck, no fused
kernels, no autocast, no channels_last, nothing clever. It exists for two things only:

* tests/test_reference.py copies the weights of a ddpm_lib.UNet into it and checks that the
  library's model computes the same function (fp32: to ~1e-5; bf16 autocast + channels_last, as
  training runs it: within a measured, looser tolerance);
* tests/bench.py times it as the "plain" baseline that the library's speed is compared with.

Parameter names and shapes are those of ddpm_lib.UNet except inside the attention block, where
nn.MultiheadAttention owns the projections: `attn.qkv.*` ↔ `attn.mha.in_proj_*` and
`attn.proj.*` ↔ `attn.mha.out_proj.*`. `from_library_state_dict` / `load_from_library` do that
renaming (the q/k/v and head layout of the fused qkv Linear is the one MultiheadAttention uses,
so the tensors are copied unchanged). It is not used by the library itself.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t: [sin(t·f_i), cos(t·f_i)], f_i = 10000^(-i/half)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class DoubleConv(nn.Module):
    def __init__(self, c_in, c_out, c_mid=None, residual=False):
        super().__init__()
        if not c_mid:
            c_mid = c_out
        self.residual = residual
        self.net = nn.Sequential(
            nn.Conv2d(c_in, c_mid, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, c_mid),
            nn.GELU(),
            nn.Conv2d(c_mid, c_out, kernel_size=3, padding=1, bias=False),
            nn.GroupNorm(1, c_out),
        )

    def forward(self, x):
        if self.residual:
            return F.gelu(x + self.net(x))
        return self.net(x)


class Down(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.conv = nn.Sequential(
            nn.MaxPool2d(2),
            DoubleConv(c_in, c_in, residual=True),
            DoubleConv(c_in, c_out),
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))

    def forward(self, x, t_emb):
        x = self.conv(x)
        emb = self.emb(t_emb)[:, :, None, None].repeat(1, 1, x.shape[-2], x.shape[-1])
        return x + emb


class Up(nn.Module):
    def __init__(self, c_in, c_out, t_dim):
        super().__init__()
        self.conv = nn.Sequential(
            DoubleConv(c_in, c_in, residual=True),
            DoubleConv(c_in, c_out, c_in // 2),
        )
        self.emb = nn.Sequential(nn.SiLU(), nn.Linear(t_dim, c_out))

    def forward(self, x, skip, t_emb):
        # upsample to the skip's size (100 → 50 → 25 → 12 does not halve evenly)
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([skip, x], dim=1)
        x = self.conv(x)
        emb = self.emb(t_emb)[:, :, None, None].repeat(1, 1, x.shape[-2], x.shape[-1])
        return x + emb


class SelfAttention(nn.Module):
    def __init__(self, channels, heads=4):
        super().__init__()
        self.channels = channels
        self.ln = nn.LayerNorm(channels)
        self.mha = nn.MultiheadAttention(channels, heads, batch_first=True)
        self.ff = nn.Sequential(
            nn.LayerNorm(channels),
            nn.Linear(channels, channels),
            nn.GELU(),
            nn.Linear(channels, channels),
        )

    def forward(self, x):
        B, C, H, W = x.shape
        x = x.view(B, C, H * W).swapaxes(1, 2)                 # (B, HW, C)
        x_ln = self.ln(x)
        attention_value, _ = self.mha(x_ln, x_ln, x_ln)
        attention_value = attention_value + x
        attention_value = self.ff(attention_value) + attention_value
        return attention_value.swapaxes(2, 1).reshape(B, C, H, W)


class ReferenceUNet(nn.Module):
    def __init__(self, width=32, time_dim=256, heads=4):
        super().__init__()
        w = width
        self.temb = TimeEmbedding(time_dim)
        self.inc = DoubleConv(3, w)
        self.down1 = Down(w, 2 * w, time_dim)
        self.down2 = Down(2 * w, 4 * w, time_dim)
        self.down3 = Down(4 * w, 4 * w, time_dim)
        self.attn = SelfAttention(4 * w, heads)
        self.up1 = Up(8 * w, 2 * w, time_dim)
        self.up2 = Up(4 * w, w, time_dim)
        self.up3 = Up(2 * w, w, time_dim)
        self.outc = nn.Conv2d(w, 3, kernel_size=1)

    def forward(self, x, t):
        t_emb = self.temb(t)
        x1 = self.inc(x)
        x2 = self.down1(x1, t_emb)
        x3 = self.down2(x2, t_emb)
        x4 = self.down3(x3, t_emb)
        x4 = self.attn(x4)
        x = self.up1(x4, x3, t_emb)
        x = self.up2(x, x2, t_emb)
        x = self.up3(x, x1, t_emb)
        return self.outc(x)


# parameter names of ddpm_lib.UNet that differ here (everything else is identical)
LIBRARY_TO_REFERENCE = {
    "attn.qkv.weight": "attn.mha.in_proj_weight",
    "attn.qkv.bias": "attn.mha.in_proj_bias",
    "attn.proj.weight": "attn.mha.out_proj.weight",
    "attn.proj.bias": "attn.mha.out_proj.bias",
}


def from_library_state_dict(sd: dict) -> dict:
    """A ddpm_lib.UNet state_dict → a ReferenceUNet state_dict (float32, contiguous NCHW)."""
    return {LIBRARY_TO_REFERENCE.get(k, k): v.detach().float().contiguous() for k, v in sd.items()}


def load_from_library(lib_model: nn.Module) -> ReferenceUNet:
    """A ReferenceUNet with the same configuration and weights as a ddpm_lib.UNet (on the CPU)."""
    attn = lib_model.attn
    ref = ReferenceUNet(width=lib_model.inc.net[0].out_channels, time_dim=lib_model.temb.dim,
                        heads=attn.heads)
    ref.load_state_dict(from_library_state_dict(lib_model.state_dict()), strict=True)
    return ref
