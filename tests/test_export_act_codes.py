"""The timestep lookup of exported activation modules: shared per call, reused per entry,
and always the numbers of the plain per-row lookup."""

from __future__ import annotations

import importlib

import pytest
import torch

from qdiff.export.act_codes import TimestepActCodes
from qdiff.quant import TimestepContext

# `qdiff.quant` exports a function of the same name, so the module is fetched by its path.
timestep_context = importlib.import_module("qdiff.quant.timestep_context")

TABLE = [999.0, 700.0, 400.0, 100.0]


def _module(context: TimestepContext, table=TABLE, seed: int = 0) -> TimestepActCodes:
    module = TimestepActCodes(4, False, len(table), context)
    gen = torch.Generator().manual_seed(seed)
    module.timesteps.copy_(torch.tensor(table))
    module.scale.copy_(torch.rand(len(table), generator=gen) + 0.1)
    module.zero_point.copy_(torch.randint(0, 16, (len(table),), generator=gen).float())
    return module


@pytest.mark.parametrize("timesteps, rows", [
    (torch.tensor(650.0), 3),              # one timestep for the batch
    (torch.tensor([990.0, 980.0]), 4),     # per sample, same entry, frames folded into the batch
    (torch.tensor([990.0, 20.0]), 4),      # per sample, different entries
    (torch.tensor([990.0, 20.0]), 2),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grid_is_the_per_row_lookup(timesteps, rows, dtype):
    context = TimestepContext()
    module = _module(context)
    x = torch.randn(rows, 5, 3, dtype=dtype)
    with context.use(timesteps):
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                got, expected = module.grid(x), module._lookup(x)
                for g, e in zip(got, expected):
                    assert g.shape == e.shape == (rows, 1, 1) and g.dtype == dtype and torch.equal(g, e)


def test_a_one_entry_table_needs_no_timestep_and_a_longer_one_says_what_is_missing():
    context = TimestepContext()
    single = _module(context, table=[500.0])
    scale, zero_point = single.grid(torch.randn(2, 3))
    assert torch.equal(scale, single.scale.expand(2, 1))
    assert torch.equal(zero_point, single.zero_point.expand(2, 1))
    with pytest.raises(RuntimeError, match="No timestep is set"):
        _module(context).grid(torch.randn(2, 3))


def test_layers_sharing_a_table_look_it_up_once_per_call(monkeypatch):
    lookups = []
    nearest_index = timestep_context.nearest_index
    monkeypatch.setattr(timestep_context, "nearest_index", lambda *a: lookups.append(1) or nearest_index(*a))
    context = TimestepContext()
    layers = [_module(context, seed=i) for i in range(5)] + [_module(context, table=[900.0, 10.0])]
    x = torch.randn(2, 4)
    for t, calls in ((800.0, 2), (800.0, 4), (30.0, 6)):  # each `set` is a new call, even at the same t
        context.set(torch.tensor(t))
        for _ in range(2):
            for layer in layers:
                assert all(torch.equal(g, e) for g, e in zip(layer.grid(x), layer._lookup(x)))
        assert len(lookups) == calls  # one per table content, not per layer or call of a layer


def test_new_tables_devices_and_dtypes_are_not_served_stale_entries():
    context = TimestepContext()
    module = _module(context)
    x = torch.randn(2, 4)
    t = torch.tensor(420.0)
    context.set(t)
    before = module.grid(x)[0].clone()
    module.load_state_dict(_module(TimestepContext(), seed=7).state_dict())
    assert not torch.equal(module.grid(x)[0], before)
    assert torch.equal(module.grid(x)[0], module._lookup(x)[0])
    module.double()
    assert module.grid(x.double())[0].dtype == torch.float64
    assert torch.equal(module.grid(x.double())[0], module._lookup(x.double())[0])
    t.fill_(0.0)  # the context holds its own copy of the timestep
    assert torch.equal(context.timesteps, torch.tensor([420.0]))
