"""Buffers that keep their dtype when the model is cast: the integer layers' grids.

`model.to(torch.bfloat16)` casts every floating-point parameter and buffer. The float
parts of an export should follow (their dtype is the user's choice), but an integer
layer's activation tables and weight scales are part of its integer definition: a
bfloat16 timestep table would round 999 to 1000 and pick another entry, and bfloat16
scales would move every code boundary. Modules built on `FixedDtypeBuffers` move their
buffers between devices but keep their dtypes, bit for bit.
"""

from __future__ import annotations

from torch import nn


class FixedDtypeBuffers(nn.Module):
    """`_apply` (`.to`, `.cuda`, `.half`, ...) moves this module's own buffers but does not
    cast them; parameters and submodules are cast as usual."""

    def _apply(self, fn, recurse: bool = True):
        originals = {name: buffer for name, buffer in self._buffers.items() if buffer is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(moved.device)
        return self
