"""Training jobs on two replicas sharing a real S3-compatible store (SeaweedFS), tiny backbone: the
replica that accepted a job runs it, the other answers for it from the store's record, serves its
memory once it polls, and passes a cancel on to the replica that runs the job."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from procs import Replica, wait_until

from app import client as sc

pytestmark = pytest.mark.slow

ADMIN_KEY = "replicas-jobs-admin-key-0123456789"


def rows(count: int = 24) -> list[dict[str, str]]:
    return [{"text": f"the film was {'good' if i % 2 else 'dull'} {i}", "label": "pos" if i % 2 else "neg"}
            for i in range(count)]  # fmt: skip


@pytest.fixture
def replicas(seaweed: Any, tiny_backbone_dir: Path, tmp_path: Path) -> Iterator[list[Replica]]:
    env = {
        **seaweed.settings_env(seaweed.bucket, f"{uuid.uuid4().hex[:12]}/memories/"),
        "SPARTAN_BACKBONE": str(tiny_backbone_dir),
        "SPARTAN_STORE_POLL_INTERVAL_S": "0.5",
        "SPARTAN_ADMIN_API_KEY": ADMIN_KEY,
    }
    started = [Replica(name, env, tmp_path) for name in ("a", "b")]  # default names: <host>:<port>
    for replica in started:
        replica.start()
    try:
        for replica in started:
            replica.wait_ready()
        yield started
    finally:
        for replica in started:
            replica.stop()


def test_one_replica_runs_the_job_and_every_replica_answers_for_it(replicas: list[Replica]) -> None:
    a, b = (sc.Client(r.url, admin_key=ADMIN_KEY, timeout_s=60) for r in replicas)
    with a, b:
        job = a.submit_job("shared", rows(), epochs=2, batch_size=8)
        seen = b.get_job(job.id)  # from the store's record
        assert seen.replica == job.replica
        assert seen.replica.endswith(f":{replicas[0].port}")
        assert job.id in {j.id for j in b.list_jobs().jobs}
        done = b.wait_job(job.id)  # followed through the replica that does not run it
        assert done.state == "succeeded", done.error
        wait_until(lambda: b.get_task("shared").version == done.version, 10, "replica b serves the memory")
        assert b.predict("shared", ["the film was good"]).version == done.version

        long = a.submit_job("stopped", rows(), epochs=1000, batch_size=8)
        wait_until(lambda: b.get_job(long.id).progress.step > 0, 60, "the long job training on a")
        asked = b.cancel_job(long.id)
        assert asked.cancel_requested
        assert asked.state == "running"  # b asked; a stops it
        wait_until(lambda: a.get_job(long.id).state == "cancelled", 20, "a cancelled the job b was asked to")
        assert b.get_job(long.id).state == "cancelled"
        with pytest.raises(sc.TaskNotFound):
            b.get_task("stopped")
