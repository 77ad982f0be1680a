"""A stand-in for app/jobs/worker.py that speaks its protocol without torch, for the job manager's tests:

    python tests/fake_worker.py MODE MEMORY_FILE <job folder>

MODE: `ok` (a two-epoch job that "trains" MEMORY_FILE, a valid memory file the test built), `hang`
(starts, then steps slowly until it is killed), `gated` (steps until MEMORY_FILE.go exists, then
succeeds), `error` (the trainer refuses the data), `crash` (exits with status 7 and no word),
`garbage` (prints lines that are not events, then succeeds).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path


def emit(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def main() -> int:
    mode, memory, folder = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    job = json.loads((folder / "job.json").read_text())
    emit("loading", pid=os.getpid())
    if mode == "crash":
        return 7
    if mode == "error":
        emit("error", message="labels not among the task's classes", type="DatasetError")
        return 1
    epochs = int(job["config"]["epochs"])
    emit("started", epochs=epochs, steps=2 * epochs, train_examples=len(job["data"]["train"]))
    gate = memory.with_name(memory.name + ".go")
    step = 0
    while mode == "hang" or (mode == "gated" and not gate.exists()):
        step += 1
        emit("step", step=step, loss=1.0 / step)
        time.sleep(0.1)
    if mode == "garbage":
        print("this is not an event", flush=True)
    report_epochs = []
    for epoch in range(1, epochs + 1):
        for step in (2 * epoch - 1, 2 * epoch):
            emit("step", step=step, loss=0.5)
        dev = {"accuracy": 0.5 + epoch / 100}
        emit("epoch", epoch=epoch, train_loss=0.5, dev=dev, seconds=0.01)
        report_epochs.append({"epoch": epoch, "train_loss": 0.5, "seconds": 0.01, "steps": 2, "dev": dev})
    shutil.copyfile(memory, folder / "memory.safetensors")
    report = {
        "epochs": report_epochs, "best_epoch": epochs, "dev": report_epochs[-1]["dev"],
        "test": {"accuracy": 0.75}, "seconds_total": 0.05, "train_examples": len(job["data"]["train"]),
    }  # fmt: skip
    emit("done", report=report, memory="memory.safetensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
