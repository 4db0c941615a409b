"""The benchmarks' code paths, run as users run them (a subprocess on one CPU device)."""
import re
import sys

from tests.cli import run


def test_mfu_on_cpu_says_it_is_not_meaningful_and_exits_0():
    result = run([sys.executable, "benchmarks/mfu.py"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MFU is not meaningful on CPU" in result.stdout
    assert "--allow_cpu" in result.stdout
    assert "ratio=" not in result.stdout


def test_mfu_allow_cpu_runs_both_sides_and_prints_a_ratio():
    """--allow_cpu --preset=tiny: the whole path (our train step, the torch reference, the timing, the
    table); on CPU no peak is known, so the ratio is of TFLOP/s."""
    result = run([sys.executable, "benchmarks/mfu.py", "--allow_cpu", "--preset=tiny", "--steps=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "MFU not shown" in out
    for side in ("emu2_jax", "reference"):
        row = next(line for line in out.splitlines() if line.strip().startswith(f"{side} |"))
        cells = [c.strip() for c in row.split("|")]
        assert float(cells[1]) > 0 and float(cells[4]) > 0, row  # s/step, TFLOP/s
        assert cells[5] == "n/a", row  # no MFU on CPU
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(r"ratio=\d+\.\d{3}", last), last
    assert float(last.split("=")[1]) > 0
