"""The `from_hidden` benchmark op (bench/from_hidden_bench.py) on a tiny shape: its providers compute the same loss
and gradients (Liger with the matching settings included), and its summary names the targets met or missed."""

from __future__ import annotations

import pytest
import torch

fhb = pytest.importorskip("bench.from_hidden_bench")


@pytest.mark.parametrize("preset", ["grpo", "dapo"])
def test_providers_agree(preset, monkeypatch):
    """naive, liger (where installed) and ours: the same loss and gradients on one batch, so the benchmark compares
    the same computation (naive_compiled is naive under torch.compile; compilation is turned off here for time)."""
    monkeypatch.setattr(fhb, "LIGER_COMPILED", False)
    monkeypatch.setenv("HADW_KERNELS_NO_COMPILE", "1")
    inp = fhb.make_inputs(2, 24, 16, preset=preset)
    names = ["naive", "ours"] + (["liger"] if fhb._liger_available(torch.device("cpu")) is None else [])
    results = {}
    for name in names:
        inp.hidden.grad = inp.weight.grad = None
        loss = fhb.providers()[name].run(inp)
        loss.backward()
        results[name] = (loss.detach(), inp.hidden.grad.clone(), inp.weight.grad.clone())
    ref = results["naive"]
    for name, (loss, gh, gw) in results.items():
        assert torch.allclose(loss, ref[0], rtol=1e-5, atol=1e-6), (name, loss.item(), ref[0].item())
        assert torch.allclose(gh, ref[1], rtol=1e-4, atol=1e-7), name
        assert torch.allclose(gw, ref[2], rtol=1e-4, atol=1e-8), name
        assert gh.abs().max() > 0


def test_targets_and_summary():
    """A made-up report: the summary lists tokens/s and each target as met or MISSED with its ratio."""
    def row(provider, ms, mb):
        return dict(provider=provider, mode="full", skipped=None, time_ms=ms, cpu_ms=ms, peak_mem_bytes=mb * 2**20)

    rep = {"shape": {"tokens": 4096}, "rows": [row("naive", 1000.0, 8000), row("naive_compiled", 800.0, 6000),
                                               row("liger", 1200.0, 300), row("ours", 900.0, 400)]}
    got = {name: met for name, met, _ in fhb.targets(rep)}
    assert got == {"peak memory <= 1/8 of naive": True, "peak memory <= liger's": False, "time <= liger's": True,
                   "time <= 1.2x naive_compiled": True}
    text = fhb.format_extra(rep)
    assert "| ours | 900.0 | 900 | 4551 | 400 | 0.050 | 1.333 | 0.750 | 1.125 |" in text
    assert "target peak memory <= liger's: MISSED (ours / liger = 1.333)" in text
    assert fhb.targets({**rep, "shape": {"tokens": 2048}}) == []  # the targets are set at >= 4k tokens
