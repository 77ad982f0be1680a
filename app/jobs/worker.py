"""A training job's process: `python -m app.jobs.worker <folder>` (started by the job manager).

Its own process, so training never runs on the serving process's threads nor changes its state: this
process lowers its own CPU priority and sets its own torch thread budget at its start, loads its own
float32 backbone (training back-propagates through it, as `spartan train` does), trains with
`train_memory`, writes the memory file into the folder and says so (protocol.py). It exits when the
serving process is gone (a parent killed with -9 leaves no trainer behind) and does nothing else:
the serving process validates and installs the memory.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, TextIO

from app.errors import SpartanError
from app.jobs.protocol import event_line, read_job  # the standard library only: no torch yet

log = logging.getLogger("app.jobs.worker")

PARENT_CHECK_S = 0.5


class Events:
    """The protocol stream: the process's original stdout, line-buffered; everything else printed
    (libraries, stray prints) goes to stderr, so it can never corrupt an event."""

    def __init__(self) -> None:
        self._out: TextIO = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
        self._lock = threading.Lock()

    def __call__(self, event: str, **fields: Any) -> None:
        with self._lock:
            self._out.write(event_line(event, **fields))


def exit_with_parent(parent: int) -> None:
    """Exit as soon as the serving process is gone (re-parented: getppid changes)."""
    if os.getppid() != parent:
        os._exit(3)  # it died before this process got here

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(3)

    threading.Thread(target=watch, name="spartan-job-parent-watch", daemon=True).start()


def run(folder: Path, emit: Events) -> None:
    job = read_job(folder)
    exit_with_parent(int(job.get("parent", os.getppid())))
    try:
        os.nice(int(job["nice"]))  # first: everything after it, imports included, yields to serving
    except OSError as err:  # not allowed here: train at the same priority, and say so
        log.warning("could not lower this process's priority: %s", err)
    emit("loading", pid=os.getpid())
    # Imported here: torch's threads are set before any torch work in this process.
    from app.engine.process import configure_torch_threads

    configure_torch_threads(int(job["threads"]))
    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder
    from app.jobs.progress import observe_training
    from app.jobs.protocol import MEMORY_FILE, decode_data
    from app.spartan.memfile import memory_to_bytes
    from app.training.trainer import TrainConfig, train_memory

    data = decode_data(job["data"])
    config = TrainConfig(**job["config"])
    encoder = SpartanEncoder(load_backbone(job["backbone"], Path(job["cache_dir"]), precision="fp32"))
    steps_per_epoch = -(-len(data.train) // config.batch_size)
    emit(
        "started", epochs=config.epochs, steps=steps_per_epoch * config.epochs, train_examples=len(data.train)
    )
    with observe_training(emit):
        memory, report = train_memory(encoder, data, config, show_progress=False)
    (folder / MEMORY_FILE).write_bytes(memory_to_bytes(memory))
    emit("done", report=report.to_json(), memory=MEMORY_FILE)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m app.jobs.worker <job folder>", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s training-job[{os.getpid()}] %(name)s: %(message)s",
    )
    emit = Events()
    try:
        run(Path(args[0]), emit)
    except SpartanError as err:  # a domain error's message is written for users
        emit("error", message=str(err), type=type(err).__name__)
        return 1
    except Exception as err:  # the traceback goes to the log; the record says what, not where
        traceback.print_exc()
        emit("error", message=f"the training process failed ({type(err).__name__}); see the service log",
             type=type(err).__name__)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
