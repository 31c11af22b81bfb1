"""scripts/read_speed.py: every width's row is printed, with the bytes each store holds per token."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("read_speed", REPO / "scripts" / "read_speed.py")
read_speed = importlib.util.module_from_spec(spec)
spec.loader.exec_module(read_speed)


def test_rows_and_bytes(capsys):
    read_speed.main(["--tokens", "128", "--dim", "64", "--heads", "2", "--repeats", "1", "--warmup", "0"])
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = line.split()
        if len(cells) == 11 and cells[1] in ("values", "keys"):
            rows[cells[0], cells[1]] = cells
    assert set(rows) == {(b, s) for b in ("1", "1.5/2", *map(str, range(2, 9))) for s in ("values", "keys")}
    # values: min-max codes plus an fp16 scale and minimum per 32 channels; vector codes plus one fp16
    # norm per 64-channel head vector (per head: b * 64 / 8 + 2 bytes).
    assert float(rows["2", "values"][9]) == 2 * 64 / 8 + 2 * 2 * 2
    assert float(rows["1.5/2", "values"][9]) == float(rows["2", "values"][9])
    assert float(rows["1.5/2", "values"][10]) == 1.5 * 64 / 8 + 2
    assert rows["1.5/2", "values"][5] == "-"  # no scalar codebook at 1.5 bits
    assert float(rows["3", "values"][10]) == 3 * 64 / 8 + 2
    assert float(rows["8", "values"][10]) == 8 * 64 / 8 + 2
