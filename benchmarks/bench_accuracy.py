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

The few-shot recipe (`spartan train --few-shot`) runs as method spartan-fast through the shipped trainer
(app.training.trainer.train_memory with few_shot_config), on the same data, length and dev-based choice:
  .venv-peers/bin/python benchmarks/bench_accuracy.py pilot --tasks banking77 trec 20ng   # dev only
  .venv-peers/bin/python benchmarks/bench_accuracy.py run --methods spartan-fast --seeds 0 1 2
  .venv-peers/bin/python benchmarks/bench_accuracy.py compare    # paired Δ vs spartan and pfeiffer

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
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine.backbone import load_backbone
from app.engine.encoder import SpartanEncoder
from app.settings import Settings
from app.training.datasets import Example, TaskData, few_shot, load_named
from app.training.trainer import FEW_SHOT_LR, few_shot_config, train_memory
from benchmarks import harness
from benchmarks.accuracy_report import accuracy, mean_std
from benchmarks.fit import FitConfig, fit
from benchmarks.peers import (
    BACKBONE_NAMES,
    METHODS,
    TRAINABLE_METHODS,
    MethodUnavailable,
    SpartanConfig,
    build,
    silence_backbone_dropout,
)

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


# The shipped few-shot recipe (`spartan train --few-shot`: app.training.trainer.few_shot_config), run
# by the shipped trainer, not benchmarks/fit.py: top-layer memories on cached lower-layer states.
FAST = "spartan-fast"
KEY = ("backbone", "task", "method", "setting", "seed", "lr")


def variant(
    layers: int | None, layernorms: int | None, epochs: int, lr: float, every: int, **more: Any
) -> dict[str, Any]:
    """Changes to few_shot_config: memories in the top `layers` (None: all), LayerNorm copies in the top
    `layernorms` (None: as the memories), `epochs`, `lr`, dev after every `every`-th epoch."""
    return {"memory_layers": layers, "layernorm_layers": layernorms, "epochs": epochs, "lr": lr,
            "eval_every": every, **more}  # fmt: skip


# The pilot's variants of the recipe (MiniLM, dev only, seed 0; docs/RESULTS.md section 3b). The
# shipped recipe is "mem4 ln3 e10 lr3e-3" on MiniLM.
PILOT = {
    "all e10 lr3e-3": variant(None, None, 10, 3e-3, 5),
    "top3 e10 lr3e-3": variant(3, None, 10, 3e-3, 5),
    "top3 e10 lr1e-2": variant(3, None, 10, 1e-2, 5),
    "top3 e10 lr3e-2": variant(3, None, 10, 3e-2, 5),
    "top3 e20 lr3e-3": variant(3, None, 20, 3e-3, 5),
    "top4 e10 lr3e-3": variant(4, None, 10, 3e-3, 5),
    "top4 e10 lr1e-2": variant(4, None, 10, 1e-2, 5),
    "mem4 ln3 e10 lr3e-3": variant(4, 3, 10, 3e-3, 5),
    "mem5 ln4 e10 lr3e-3": variant(5, 4, 10, 3e-3, 5),
    # Second pilot round: changes to the recipe that cost no extra layer per step.
    "mem4 ln3 E32": variant(4, 3, 10, 3e-3, 5, num_parents=32),
    "mem4 ln3 every1": variant(4, 3, 10, 3e-3, 1),
    "mem4 ln3 drop0": variant(4, 3, 10, 3e-3, 5, dropout=0.0),
    "mem4 ln3 lr5e-3": variant(4, 3, 10, 5e-3, 5),
    "mem4 ln3 E32 e10 lr3e-3": variant(4, 3, 10, 3e-3, 5, num_parents=32),  # the one run on the suite
    # The recipe as it was before its steps were cut into length-sorted micro-batches under bf16
    # autocast (stop 19's suite records of "spartan-fast", renamed).
    "mem4 ln3 fp32 one-pass": variant(4, 3, 10, 3e-3, 5, step_overhead_tokens=None, bf16_steps=False),
    # Third round: the variants above ran before steps were cut into micro-batches under bf16; these
    # run with both (the trainer's defaults now). Cheaper steps leave room for every layer.
    "all e10 lr3e-3 bf16 split": variant(None, None, 10, 3e-3, 5),
    "all e5 lr3e-3 bf16 split": variant(None, None, 5, 3e-3, 5),
    "all e5 lr5e-3 bf16 split": variant(None, None, 5, 5e-3, 5),
    "all e6 lr3e-3 every3 bf16 split": variant(None, None, 6, 3e-3, 3),
    "all e8 lr3e-3 every4 bf16 split": variant(None, None, 8, 3e-3, 4),
    "mem6 ln5 e8 every4 bf16 split": variant(6, 5, 8, 3e-3, 4),
}


@functools.cache
def spartan_encoder(backbone: str, cache_dir: Path) -> SpartanEncoder:
    """One encoder per process: training a memory leaves the backbone as it was."""
    loaded = load_backbone(BACKBONE_NAMES.get(backbone, backbone), cache_dir)
    silence_backbone_dropout(loaded.model)  # as for every method here (it is in eval mode anyway)
    return SpartanEncoder(loaded)


def record_of(job: tuple[Any, ...], data: TaskData, started: float, **fields: Any) -> dict[str, Any]:
    return {**dict(zip(KEY, job, strict=True)), "train_examples": len(data.train), **fields,
            "wall_seconds": round(time.perf_counter() - started, 1), "threads": torch.get_num_threads(),
            "budget": asdict(BUDGETS[job[3]])}  # fmt: skip


def run_recipe(
    backbone: str,
    task: str,
    setting: str,
    seed: int,
    cache_dir: Path,
    changes: dict[str, Any],
    *,
    test: bool = True,
    method: str = FAST,
) -> dict[str, Any]:
    """The few-shot recipe (with `changes`) through app.training.trainer.train_memory, on this
    benchmark's data and budget length; without `test`, the test split is not even scored."""
    data = task_data(task, setting, seed, cache_dir)
    data = data if test else replace(data, test=[])
    encoder = spartan_encoder(backbone, cache_dir)
    smoke = {"epochs": BUDGETS[setting].epochs, "eval_every": 1} if setting == "smoke" else {}
    changes = {"max_length": BUDGETS[setting].max_length, "seed": seed, **changes, **smoke}
    config = few_shot_config(encoder.backbone.num_layers, **changes)
    started = time.perf_counter()
    memory, report = train_memory(encoder, data, config, show_progress=False)
    return record_of(
        (backbone, task, method, setting, seed, config.lr), data, started,
        recipe=asdict(config), first_memory_layer=memory.spec.first_memory_layer, dev=report.dev,
        test=report.test, best_epoch=report.best_epoch, epochs_run=len(report.epochs),
        dev_by_epoch={r.epoch: r.dev for r in report.epochs if r.dev},
        steps=sum(r.steps for r in report.epochs),
        prepare_seconds=round(report.prepare_seconds, 2), seconds_to_best=round(report.seconds_to_best, 2),
        train_seconds=round(report.seconds_total, 2), trainable_parameters=report.trainable_parameters,
        task_bytes=report.memory_bytes,
    )  # fmt: skip


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
    if method.startswith(FAST):  # spartan-fast[NAME]: the pilot's variant NAME, on the suite
        changes = PILOT[method[len(FAST) + 1 : -1]] if method != FAST else {"lr": lr}
        return run_recipe(backbone, task, setting, seed, cache_dir, changes, method=method)
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
    return record_of(
        (backbone, task, method, setting, seed, lr), data, started, dev=result.dev, test=result.test,
        best_epoch=result.best_epoch, steps=result.steps, train_seconds=round(result.train_seconds, 2),
        median_step_ms=round(statistics.median(result.step_ms), 1),
        trainable_parameters=sum(p.numel() for p in built.model.trainable()),
        task_bytes=built.model.task_bytes(),
    )  # fmt: skip


read_records, append_record = harness.read_records, harness.append_record


def execute(plan: list[tuple[Any, ...]], path: Path, cache_dir: Path, shard: tuple[int, int]) -> None:
    """Run each planned (backbone, task, method, setting, seed, lr) not yet in the results file."""
    done = {tuple(r[k] for k in KEY) for r in read_records(path)}
    # Shard by (task, seed), not by run: every method of a task and seed runs in the same process, so
    # a benchmark stopped early has all methods for the same tasks and seeds.
    groups = list(dict.fromkeys((job[1], job[4]) for job in plan))
    mine = [job for job in plan if groups.index((job[1], job[4])) % shard[1] == shard[0] and job not in done]
    print(f"{len(mine)} runs to do ({len(plan)} planned, {len(done)} already recorded)", flush=True)
    for number, job in enumerate(mine, 1):
        try:
            backbone, task, method, setting, seed, lr = job
            record = run_one(backbone, task, method, setting, seed, lr, cache_dir)
        except MethodUnavailable as err:
            record = {**dict(zip(KEY, job, strict=True)), "unavailable": str(err)}
        append_record(path, record)
        test = record.get("test", {})
        print(f"[{number}/{len(mine)}] {job}: test {test} ({record.get('wall_seconds', 0)} s)", flush=True)


def pilot(variants: list[str], tasks: list[str], backbone: str, path: Path, cache_dir: Path) -> None:
    """Each recipe variant on each task, seed 0, dev only (the choice never sees a test split)."""
    done = {(r["backbone"], r["task"], r["variant"]) for r in read_records(path)}
    jobs = [(t, v) for v in variants for t in tasks if (backbone, t, v) not in done]
    print(f"{len(jobs)} pilot runs to do", flush=True)
    for number, (task, name) in enumerate(jobs, 1):
        record = run_recipe(backbone, task, "few", 0, cache_dir, PILOT[name], test=False)
        append_record(path, {**{k: v for k, v in record.items() if k != "test"}, "variant": name})
        print(f"[{number}/{len(jobs)}] {task} {name}: dev {record['dev']} ({record['wall_seconds']} s)")
    table: dict[str, dict[str, float]] = {}
    for record in read_records(path):
        if record["backbone"] == backbone:
            table.setdefault(record["variant"], {})[record["task"]] = 100 * record["dev"]["accuracy"]
    for name, scores in table.items():
        cells = " ".join(f"{t} {v:.1f}" for t, v in scores.items())
        print(f"{name:>24}: {cells} | mean {statistics.mean(scores.values()):.2f}")


def compare(path: Path, method: str, baselines: Sequence[str]) -> str:
    """Markdown: per task, test accuracy (mean ± std over seeds) of `method` and each baseline, and the
    paired differences (same task, seed, training draw and test subset)."""
    score = {(r["task"], r["method"], r["seed"]): accuracy(r) for r in read_records(path) if "test" in r}
    tasks = [t for t in SUITE if any(k[:2] == (t, method) for k in score)]
    seeds = {t: sorted(k[2] for k in score if k[:2] == (t, method)) for t in tasks}
    lines = [f"| task | {method} | " + " | ".join(f"{b} | Δ vs {b}" for b in baselines) + " |"]
    lines.append("|---" * (2 + 2 * len(baselines)) + "|")
    deltas: dict[str, list[float]] = {b: [] for b in baselines}
    for task in tasks:
        mine = [score[(task, method, s)] for s in seeds[task]]
        cells = [mean_std(mine)]
        for base in baselines:
            theirs = [score.get((task, base, s)) for s in seeds[task]]
            paired = [a - b for a, b in zip(mine, theirs, strict=True) if b is not None]
            deltas[base] += paired
            cells += [
                mean_std([b for b in theirs if b is not None]),
                f"{statistics.mean(paired):+.2f}" if paired else "—",
            ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    averages = {  # over tasks of the mean over seeds; only for a method with every (task, seed)
        m: statistics.mean(statistics.mean(score[(t, m, s)] for s in seeds[t]) for t in tasks)
        for m in (method, *baselines)
        if tasks and all((t, m, s) in score for t in tasks for s in seeds[t])
    }
    cells = [f"{averages[method]:.2f}" if method in averages else "—"]
    for base in baselines:
        both = method in averages and base in averages
        cells += [f"{averages[base]:.2f}" if base in averages else "—",
                  f"{averages[method] - averages[base]:+.2f}" if both else "—"]  # fmt: skip
    lines.append("| **average** | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| paired Δ (points) | pairs | mean | std | wins / ties / losses |",
        "|---|---|---|---|---|",
    ]
    for base, values in deltas.items():
        if len(values) > 1:
            wins, ties = sum(v > 0 for v in values), sum(v == 0 for v in values)
            mean, std, losses = statistics.mean(values), statistics.stdev(values), len(values) - wins - ties
            counts = f"{wins} / {ties} / {losses}"
            lines.append(f"| {method} - {base} | {len(values)} | {mean:+.2f} | {std:.2f} | {counts} |")
    return "\n".join(lines) + "\n"


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
    parser = harness.parser(__doc__, harness.RESULTS)
    parser.add_argument("step", choices=("lr-search", "pilot", "run", "compare", "report"))
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--setting", choices=("few", "full"), default="few")
    parser.add_argument("--task", default="banking77", help="lr-search: the one task whose dev split chooses")
    parser.add_argument("--tasks", nargs="+", default=list(SUITE))
    parser.add_argument("--methods", nargs="+", default=[m for m in TRAINABLE_METHODS if m != "ia3"])
    parser.add_argument("--variants", nargs="+", default=list(PILOT), help="pilot: recipe variants")
    parser.add_argument("--against", nargs="+", default=["spartan", "pfeiffer"], help="compare: baselines")
    parser.add_argument("--method", default=FAST, help="compare: the method compared (default: the recipe)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    lrs_from = "use the learning rates another backbone's lr-search chose (saves a search)"
    parser.add_argument("--lrs-from", help=lrs_from)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    unknown = set(args.methods) - {*METHODS, FAST, *(f"{FAST}[{name}]" for name in PILOT)}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}")
    if args.step == "report":
        from benchmarks.accuracy_report import write_report

        write_report(args.out)
        return
    search_path = results_file("lrsearch", args.backbone, args.out)
    if args.smoke:
        args.setting = "smoke"
    if args.step == "compare":  # the few-shot recipe against today's SPARTAN (and peers), paired
        table = compare(results_file(args.setting, args.backbone, args.out), args.method, args.against)
        if args.method == FAST:
            (args.out / f"accuracy_fast_{args.backbone}.md").write_text(table)
        print(table)
        return
    if args.step == "pilot":
        pilot(
            args.variants,
            args.tasks,
            args.backbone,
            results_file("pilot", args.backbone, args.out),
            cache_dir,
        )
        return
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
    smoke_lrs = {m: CENTRE_LR[m] for m in args.methods if m in CENTRE_LR}
    lrs = smoke_lrs if args.smoke else chosen_lrs(source, lrs_from)
    lrs[FAST] = FEW_SHOT_LR  # the recipe's own, not searched
    lrs |= {f"{FAST}[{name}]": changes["lr"] for name, changes in PILOT.items()}
    missing = [m for m in args.methods if m not in lrs]
    if missing:
        parser.error(f"no learning rate chosen yet for {missing}: run the lr-search step first")
    path = results_file(args.setting, args.backbone, args.out)
    execute(list(plan_runs(args, lrs)), path, cache_dir, args.shard)
    meta = {"date": date.today().isoformat(), "machine": platform.platform(), "command": " ".join(sys.argv)}
    append_record(args.out / "accuracy_runs_log.jsonl", meta)


if __name__ == "__main__":
    main()
