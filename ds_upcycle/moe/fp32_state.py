"""Balancing state that stays fp32 when its module is cast."""

from __future__ import annotations

from torch import nn


class Fp32Buffers(nn.Module):
    """A module whose buffers named in `fp32_buffers` stay fp32 through `.to(dtype)`, `.half()`, ...

    DeepSpeed casts the whole model to bf16/fp16; a selection-bias step of 1e-3 would vanish below a
    bf16 ulp, and token counts would round, so the balancing state keeps fp32."""

    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        for name in self.fp32_buffers:
            self.get_buffer(name).data = self.get_buffer(name).data.float()
        return self
