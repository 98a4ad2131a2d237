"""Running a net in the memory layout its layers are fastest in, as a wrapper around it.

A net says `prefers_channels_last = True` when its kernels run faster on channels_last
activations (convolutions, pooling, upsampling on CPU and CUDA): the execution policy then
calls it through `ChannelsLast`, so the net's own forward reads as the paper writes it.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

FLAGS = ("batch_independent", "accepts_any_sigma", "prefers_channels_last")
"""ScoreNet flags a wrapper passes on, so what sees the wrapper sees the net's answers."""


class ChannelsLast(nn.Module):
    """`net(x, sigma, level)` with x (and so every activation) in channels_last; the output
    comes back in x's own memory format. The values are the net's, up to float rounding."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for flag in FLAGS:
            if hasattr(net, flag):
                setattr(self, flag, getattr(net, flag))

    def forward(self, x: Tensor, sigma: Tensor, level: Tensor) -> Tensor:
        if x.dim() != 4:
            return self.net(x, sigma, level)
        keep = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous() else torch.contiguous_format
        out = self.net(x.contiguous(memory_format=torch.channels_last), sigma, level)
        return out.contiguous(memory_format=keep)


def in_preferred_layout(net: nn.Module, device: torch.device) -> nn.Module:
    """`net` wrapped in ChannelsLast where it prefers that and the device has fast kernels for
    it (CPU, CUDA); otherwise the net itself."""
    if getattr(net, "prefers_channels_last", False) and device.type in ("cpu", "cuda"):
        return ChannelsLast(net)
    return net
