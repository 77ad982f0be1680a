"""`spartan serve` as a real process: a SIGTERM after a clean drain exits 0, not 143 (a supervisor, a
shell script or CI reads 143 as "killed")."""

from __future__ import annotations

import signal
from pathlib import Path

from procs import Replica


def test_sigterm_after_a_clean_drain_exits_0(tmp_path: Path, tiny_backbone_dir: Path) -> None:
    (tmp_path / "memories").mkdir()
    env = {
        "SPARTAN_BACKBONE": str(tiny_backbone_dir),
        "SPARTAN_MEMORY_DIR": str(tmp_path / "memories"),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0",
    }
    replica = Replica("exit", env, tmp_path).start_ready(timeout_s=120)
    try:
        replica.send(signal.SIGTERM)
        code = replica.wait(60)
    finally:
        replica.kill9()
    log = replica.log.read_text(errors="replace")
    assert "Application shutdown complete" in log, log[-2000:]  # the drain ran to its end
    assert code == 0, log[-2000:]
