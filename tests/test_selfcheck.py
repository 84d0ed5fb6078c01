"""The GPU self-check in its CPU mode: the same code path, at toy scale, passes every row."""
from __future__ import annotations

import torch

from experiments.selfcheck import Check, format_table, main, selfcheck


def test_selfcheck_passes_in_cpu_mode(tmp_path, capsys):
    rows = selfcheck(tmp_path / "sc", force_cpu=True)
    names = [r.name for r in rows]
    assert names[:2] == ["environment", "job"] and "slim = masked (job's masks)" in names
    assert "5 pruning steps within budget" in names and "measured latency" in names
    failed = [r for r in rows if not r.ok]
    assert not failed, format_table(rows) + "\n" + (tmp_path / "sc" / "job.log").read_text()[-3000:]
    if not torch.cuda.is_available():
        assert "CPU mode" in rows[0].detail
    # the command prints the table and fails (exit 1) on a failing row
    assert "FAIL" in format_table([Check("x", False, "broken")])
    assert main(["--out", str(tmp_path / "sc"), "--cpu"]) == 0  # the job's result is reused: seconds
    assert "self-check PASSED" in capsys.readouterr().out
