"""Accuracy of SPARTAN against its peers on one frozen backbone: same data, splits, loop and budget.

Runs in the peers' environment (`make peers-env`; see benchmarks/peers.py for the methods). Three steps,
each resumable (every finished run is one line of a JSONL file; a rerun skips what is there):

  # 1. learning rate per method: the same grid size for every method, chosen on ONE task's dev split
  .venv-peers/bin/python benchmarks/bench_accuracy.py lr-search --task banking77
  # 2. the suite: every task x method x seed, at the chosen learning rates
  .venv-peers/bin/python benchmarks/bench_accuracy.py run --setting few --seeds 0 1 2
  .venv-peers/bin/python benchmarks/bench_accuracy.py run --setting full --tasks trec banking77
  # 3. tables (mean, std over seeds) and plot in docs/results/
  .venv-peers/bin/python benchmarks/bench_accuracy.py report

`--smoke` runs a few examples of one task in seconds (used by the test suite). `--shard I/N` splits the
runs over N processes (on 2 cores, two 1-thread processes get more done than one 2-thread process).
Few-shot: 200 stratified training examples drawn per seed (the draw is part of what the seed varies).
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import random
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.settings import Settings
from app.training.datasets import Example, TaskData, few_shot, load_named
from benchmarks import harness
from benchmarks.fit import FitConfig, fit
from benchmarks.peers import METHODS, TRAINABLE_METHODS, MethodUnavailable, SpartanConfig, build

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
SUITE = ("movie", "imdb", "banking77", "clinc150", "trec", "stackoverflow", "20ng", "dbpedia", "clinc-pair")
# The grid every method gets: its usual learning rate and one step either side (x/3, x*3).
CENTRE_LR = {
    "head": 3e-3,
    "spartan": 3e-3,
    "pfeiffer": 1e-3,
    "houlsby": 1e-3,
    "lora": 1e-3,
    "ia3": 3e-3,
    "bitfit": 1e-3,
    "full": 5e-5,
}


@dataclass(frozen=True)
class Budget:
    """The same for every method in a setting."""

    epochs: int
    max_length: int
    train_cap: int | None  # few-shot size, or a cap on "full" training data (None: all of it)
    dev_cap: int
    test_cap: int
    eval_every: int


BUDGETS = {
    "few": Budget(epochs=10, max_length=64, train_cap=200, dev_cap=300, test_cap=600, eval_every=5),
    # "full" is capped at 5,000 training examples (25x few-shot; TREC's 4,849 stay whole): the
    # uncapped suite is ~8 h per seed on 2 CPU cores, the capped one ~1 h.
    "full": Budget(epochs=2, max_length=64, train_cap=5000, dev_cap=500, test_cap=2000, eval_every=1),
    "smoke": Budget(epochs=1, max_length=32, train_cap=24, dev_cap=12, test_cap=12, eval_every=1),
}


def subsample(examples: Sequence[Example], n: int, seed: str) -> list[Example]:
    """A fixed random subset (same for every method and seed: scores stay comparable)."""
    if len(examples) <= n:
        return list(examples)
    return random.Random(seed).sample(list(examples), n)


@functools.cache
def load_cached(name: str, cache_dir: Path) -> TaskData:
    return load_named(name, cache_dir)  # IMDB's CSV takes seconds to parse: once per process


def task_data(name: str, setting: str, seed: int, cache_dir: Path) -> TaskData:
    budget = BUDGETS[setting]
    data = load_cached(name, cache_dir)
    data = replace(
        data,
        dev=subsample(data.dev, budget.dev_cap, f"{name}:dev"),
        test=subsample(data.test, budget.test_cap, f"{name}:test"),
    )
    if budget.train_cap is None:
        return data
    if setting == "full":
        return replace(data, train=subsample(data.train, budget.train_cap, f"{name}:train"))
    return few_shot(data, budget.train_cap, seed=seed)


def run_one(
    backbone: str,
    task: str,
    method: str,
    setting: str,
    seed: int,
    lr: float,
    cache_dir: Path,
    spartan: SpartanConfig | None = None,
) -> dict[str, Any]:
    budget = BUDGETS[setting]
    data = task_data(task, setting, seed, cache_dir)
    built = build(
        method, backbone, cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=seed, spartan=spartan
    )
    config = FitConfig(
        lr=lr, epochs=budget.epochs, max_length=budget.max_length, eval_every=budget.eval_every, seed=seed
    )
    started = time.perf_counter()
    result = fit(built, data, config)
    steps = sorted(result.step_ms)
    return {
        "backbone": backbone,
        "task": task,
        "method": method,
        "setting": setting,
        "seed": seed,
        "lr": lr,
        "train_examples": len(data.train),
        "dev": result.dev,
        "test": result.test,
        "best_epoch": result.best_epoch,
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 2),
        "median_step_ms": round(steps[len(steps) // 2], 1),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "trainable_parameters": sum(p.numel() for p in built.model.trainable()),
        "task_bytes": built.model.task_bytes(),
        "threads": torch.get_num_threads(),
        "budget": asdict(budget),
    }


def key_of(record: dict[str, Any]) -> tuple[Any, ...]:
    return (
        record["backbone"],
        record["task"],
        record["method"],
        record["setting"],
        record["seed"],
        record["lr"],
    )


read_records, append_record = harness.read_records, harness.append_record  # bench_spartan_tuning uses them


def execute(plan: list[tuple[Any, ...]], path: Path, cache_dir: Path, shard: tuple[int, int]) -> None:
    """Run each planned (backbone, task, method, setting, seed, lr) not yet in the results file."""
    done = {key_of(r) for r in read_records(path)}
    # Shard by (task, seed), not by run: every method of a task and seed runs in the same process, so
    # a benchmark stopped early has all methods for the same tasks and seeds.
    groups = list(dict.fromkeys((job[1], job[4]) for job in plan))
    mine = [job for job in plan if groups.index((job[1], job[4])) % shard[1] == shard[0] and job not in done]
    print(f"{len(mine)} runs to do ({len(plan)} planned, {len(done)} already recorded)", flush=True)
    for number, job in enumerate(mine, 1):
        backbone, task, method, setting, seed, lr = job
        try:
            record = run_one(backbone, task, method, setting, seed, lr, cache_dir)
        except MethodUnavailable as err:
            record = {**dict(zip(("backbone", "task", "method", "setting", "seed", "lr"), job, strict=True))}
            record["unavailable"] = str(err)
        append_record(path, record)
        test = record.get("test", {})
        print(f"[{number}/{len(mine)}] {job}: test {test} ({record.get('wall_seconds', 0)} s)", flush=True)


def lr_grid(method: str) -> list[float]:
    centre = CENTRE_LR[method]
    return [centre / 3, centre, centre * 3]


def chosen_lrs(path: Path, backbone: str) -> dict[str, float]:
    """Per method, the grid learning rate with the best dev score in the lr-search records."""
    best: dict[str, tuple[float, float]] = {}
    for record in read_records(path):
        if record["backbone"] != backbone or "dev" not in record:
            continue
        value = record["dev"].get("accuracy", record["dev"].get("pearson", 0.0))
        if record["method"] not in best or value > best[record["method"]][0]:
            best[record["method"]] = (value, record["lr"])
    return {method: lr for method, (_, lr) in best.items()}


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


def results_file(kind: str, backbone: str, out: Path) -> Path:
    return out / f"accuracy_{kind}_{backbone}.jsonl"


def plan_runs(args: argparse.Namespace, lrs: dict[str, float]) -> Iterator[tuple[Any, ...]]:
    # Seed outermost: a run cut short still covers every task and method with the first seeds.
    for seed in args.seeds:
        for task in args.tasks:
            for method in args.methods:
                if method in lrs:
                    yield (args.backbone, task, method, args.setting, seed, lrs[method])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=("lr-search", "run", "report"))
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--setting", choices=("few", "full"), default="few")
    parser.add_argument("--task", default="banking77", help="lr-search: the one task whose dev split chooses")
    parser.add_argument("--tasks", nargs="+", default=list(SUITE))
    parser.add_argument("--methods", nargs="+", default=[m for m in TRAINABLE_METHODS if m != "ia3"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    parser.add_argument(
        "--lrs-from", help="use the learning rates another backbone's lr-search chose (saves a search)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="a few examples of one task, seconds")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    if args.step == "report":
        from benchmarks.accuracy_report import write_report

        write_report(args.out)
        return
    search_path = results_file("lrsearch", args.backbone, args.out)
    if args.smoke:
        args.setting = "smoke"
    if args.step == "lr-search":
        plan = [
            (args.backbone, args.task, method, args.setting, 0, lr)
            for method in args.methods
            for lr in lr_grid(method)
        ]
        execute(plan, search_path, cache_dir, args.shard)
        print(json.dumps(chosen_lrs(search_path, args.backbone)))
        return
    lrs_from = args.lrs_from or args.backbone
    source = results_file("lrsearch", lrs_from, args.out)
    lrs = {m: CENTRE_LR[m] for m in args.methods} if args.smoke else chosen_lrs(source, lrs_from)
    missing = [m for m in args.methods if m not in lrs]
    if missing:
        parser.error(f"no learning rate chosen yet for {missing}: run the lr-search step first")
    path = results_file(args.setting, args.backbone, args.out)
    execute(list(plan_runs(args, lrs)), path, cache_dir, args.shard)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "command": " ".join(sys.argv)}
    append_record(args.out / "accuracy_runs_log.jsonl", meta)


if __name__ == "__main__":
    main()
