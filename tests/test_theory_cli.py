"""The `hadw-theory` CLI end to end (main(argv) and a subprocess), the anchor simulator, and the import hygiene
of `hadw_kernels` (no scipy, no matplotlib)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("scipy")
pytest.importorskip("matplotlib")

from hadw_kernels.theory import drifting_accuracy, simulate_anchor  # noqa: E402
from hadw_kernels.theory.cli import main  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(8) == PNG_MAGIC and os.path.getsize(path) > 5_000


def test_tables_prints_paper_and_ours(capsys, tmp_path):
    assert main(["tables", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.827762" in out and "0.82776479" in out  # Table 4, G = 6: paper and ours
    assert "0.74547900" in out  # ... and the conditional reading
    assert "max |average - paper| = 5.00e-06" in out
    assert _is_png(tmp_path / "theory_underestimate_prob.png")


def test_bias_prints_and_plots(capsys, tmp_path):
    assert main(["bias", "--G", "8", "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "G = 8" in out and "+0.07558" in out  # advantage_bias(0.1, 8)
    assert _is_png(tmp_path / "plots" / "theory_bias.png")


def test_bias_without_out_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bias", "--G", "4", "16"]) == 0
    assert "G = 16" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_hadw_prints_and_plots(capsys, tmp_path):
    assert main(["hadw", "--G", "8", "--anchor", "0.5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "HA-DW helps at λ = 1.3" in out and "λ-range" in out
    assert _is_png(tmp_path / "theory_hadw_G8_anchor0.5.png")
    assert main(["hadw", "--G", "4", "--anchor", "p", "--adv-norm", "group_std", "--lambda", "1.0"]) == 0
    assert "anchor C = p" in capsys.readouterr().out


def test_anchor_prints_and_plots(capsys, tmp_path):
    assert main(["anchor", "--steps", "60", "--prompts", "16", "--eta", "0.1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "window (h=10)" in out and "ema (eta=0.1)" in out and "fixed (0.5)" in out
    assert _is_png(tmp_path / "theory_anchor.png")


@pytest.mark.parametrize("argv", [["bias", "--G", "1"], ["hadw", "--anchor", "1.5"], ["hadw", "--anchor", "x"],
                                  ["hadw", "--lambda", "-1"], ["nope"], []])
def test_bad_cli_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_value_errors_become_exit_status_2(capsys):
    assert main(["anchor", "--steps", "10", "--start", "1.5"]) == 2
    assert "start must be in [0, 1]" in capsys.readouterr().err


def test_module_entry_point_and_import_hygiene():
    # One interpreter (torch takes seconds to import): first the import check, then `python -m hadw_kernels.theory`.
    code = ("import runpy, sys, hadw_kernels, hadw_kernels.theory; "
            "print(sorted(m for m in ('scipy', 'matplotlib') if m in sys.modules)); "
            "sys.argv = ['hadw-theory', 'tables']; runpy.run_module('hadw_kernels.theory', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "[]"
    assert "0.640945" in res.stdout


# -- the anchor simulator ------------------------------------------------------------------------------------------
def test_simulate_anchor_shows_the_ema_freeze():
    acc = drifting_accuracy(120, 0.2, 0.7, "linear")
    anchors = {"window": dict(mode="window", window=10), "ema": dict(mode="ema", eta=0.1),
               "fixed": dict(mode="fixed", fixed_value=0.5)}
    y, traces = simulate_anchor(acc, anchors, G=8, prompts=64, seed=1)
    assert y.shape == (120,)
    # Window tracks the drift (lagging ~5 steps of a 0.0042/step ramp); ema with a small eta freezes at its start.
    assert traces["window"].tracking_error(acc) < 0.04
    ema = traces["ema"]
    assert np.max(np.abs(ema.prior[5:] - ema.prior[5])) < 1e-3 and ema.eta_t[-1] < 1e-6
    assert ema.tracking_error(acc) > 0.2
    np.testing.assert_array_equal(traces["fixed"].prior, 0.5)
    assert np.isnan(traces["window"].eta_t).all()


def test_simulate_anchor_is_seeded():
    acc = drifting_accuracy(30, shape="step")
    y1, t1 = simulate_anchor(acc, seed=3, prompts=8)
    y2, t2 = simulate_anchor(acc, seed=3, prompts=8)
    np.testing.assert_array_equal(y1, y2)
    for name in t1:
        np.testing.assert_array_equal(t1[name].prior, t2[name].prior)
