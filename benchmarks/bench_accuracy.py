"""Accuracy of SPARTAN against its peers on one frozen backbone: same data, splits, loop and budget.

Runs in the peers' environment (`make peers-env`; the methods: benchmarks/peers.py). Each finished run is
one line of a JSONL file, so every step resumes where it stopped; `--shard I/N` splits the runs over N
processes; `--smoke` runs a few examples of one task in seconds (the test suite runs it).

  .venv-peers/bin/python benchmarks/bench_accuracy.py lr-search --task banking77  # lr chosen on one dev split
  .venv-peers/bin/python benchmarks/bench_accuracy.py run --setting few --seeds 0 1 2
  .venv-peers/bin/python benchmarks/bench_accuracy.py report  # tables and plot in docs/results/accuracy.*
  .venv-peers/bin/python benchmarks/bench_accuracy.py pilot --tasks banking77 trec 20ng  # recipe, dev only
  .venv-peers/bin/python benchmarks/bench_accuracy.py run --methods spartan-fast --seeds 0 1 2
  .venv-peers/bin/python benchmarks/bench_accuracy.py compare  # paired Δ vs spartan and pfeiffer

spartan-fast is the shipped few-shot recipe (`spartan train --few-shot`) run by the shipped trainer.
Method: docs/RESULTS.md, sections 1.1 and 3b.
"""

from __future__ import annotations

import functools
import itertools
import json
import platform
import random
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
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
from benchmarks import harness, peers
from benchmarks.fit import FitConfig, fit

SUITE = ("movie", "imdb", "banking77", "clinc150", "trec", "stackoverflow", "20ng", "dbpedia", "clinc-pair")
# The grid every method gets: its usual learning rate and one step either side (x/3, x*3).
CENTRE_LR = dict(
    head=3e-3, spartan=3e-3, pfeiffer=1e-3, houlsby=1e-3, lora=1e-3, ia3=3e-3, bitfit=1e-3, full=5e-5
)
METHOD_ORDER = tuple(CENTRE_LR)  # the reports' column order
TITLES = {
    "few": "few-shot (200 training examples)",
    "full": "training data up to 5,000 examples per task (all of TREC; a fixed subset elsewhere)",
    "smoke": "smoke run (tiny data: checks the pipeline, not accuracy)",
}


@dataclass(frozen=True)
class Budget:
    """The same for every method in a setting."""

    epochs: int
    max_length: int
    train_cap: int  # few-shot size, or a cap on "full" training data
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
load_cached = functools.cache(load_named)  # IMDB's CSV takes seconds to parse: once per process


def subsample(examples: Sequence[Example], n: int, seed: str) -> list[Example]:
    """A fixed random subset (same for every method and seed: scores stay comparable)."""
    return list(examples) if len(examples) <= n else random.Random(seed).sample(list(examples), n)


def task_data(name: str, setting: str, seed: int, cache_dir: Path) -> TaskData:
    """The task's splits under the setting's caps; few-shot training examples are drawn per seed."""
    budget, data = BUDGETS[setting], load_cached(name, cache_dir)
    dev = subsample(data.dev, budget.dev_cap, f"{name}:dev")
    data = replace(data, dev=dev, test=subsample(data.test, budget.test_cap, f"{name}:test"))
    if setting == "full":
        return replace(data, train=subsample(data.train, budget.train_cap, f"{name}:train"))
    return few_shot(data, budget.train_cap, seed=seed)


# The shipped few-shot recipe (app.training.trainer.few_shot_config), run by the shipped trainer, not
# benchmarks/fit.py: top-layer memories on cached lower-layer states.
FAST = "spartan-fast"
KEY = ("backbone", "task", "method", "setting", "seed", "lr")  # a job: one run


def variant(mem: int | None, ln: int | None, epochs: int, lr: float, every: int, **more: Any) -> dict:
    """Changes to few_shot_config: memories in the top `mem` layers (None: all), LayerNorm copies in the
    top `ln` (None: as the memories), `epochs`, `lr`, dev after every `every`-th epoch."""
    return dict(memory_layers=mem, layernorm_layers=ln, epochs=epochs, lr=lr, eval_every=every, **more)


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
    # Second round: changes that cost no extra layer per step.
    "mem4 ln3 E32": variant(4, 3, 10, 3e-3, 5, num_parents=32),
    "mem4 ln3 every1": variant(4, 3, 10, 3e-3, 1),
    "mem4 ln3 drop0": variant(4, 3, 10, 3e-3, 5, dropout=0.0),
    "mem4 ln3 lr5e-3": variant(4, 3, 10, 5e-3, 5),
    "mem4 ln3 E32 e10 lr3e-3": variant(4, 3, 10, 3e-3, 5, num_parents=32),  # the one run on the suite
    # The recipe before length-sorted micro-batches under bf16 autocast (stop 19's "spartan-fast").
    "mem4 ln3 fp32 one-pass": variant(4, 3, 10, 3e-3, 5, step_overhead_tokens=None, bf16_steps=False),
    # Third round, with both (the trainer's defaults now): cheaper steps leave room for every layer.
    "all e10 lr3e-3 bf16 split": variant(None, None, 10, 3e-3, 5),
    "all e5 lr3e-3 bf16 split": variant(None, None, 5, 3e-3, 5),
    "all e5 lr5e-3 bf16 split": variant(None, None, 5, 5e-3, 5),
    "all e6 lr3e-3 every3 bf16 split": variant(None, None, 6, 3e-3, 3),
    "all e8 lr3e-3 every4 bf16 split": variant(None, None, 8, 3e-3, 4),
    "mem6 ln5 e8 every4 bf16 split": variant(6, 5, 8, 3e-3, 4),
    # The recipe as shipped since stop 20 (float32 steps, micro-batches): "spartan-fast"'s records are
    # the bf16 run of section 3c, kept under that name.
    "mem4 ln3 fp32 split": variant(4, 3, 10, 3e-3, 5, bf16_steps=False),
}


@functools.cache
def spartan_encoder(backbone: str, cache_dir: Path) -> SpartanEncoder:
    """One encoder per process: training a memory leaves the backbone as it was."""
    loaded = load_backbone(peers.BACKBONE_NAMES.get(backbone, backbone), cache_dir)
    peers.silence_backbone_dropout(loaded.model)  # as for every method here (it is in eval mode anyway)
    return SpartanEncoder(loaded)


def record_of(job: tuple[Any, ...], data: TaskData, started: float, **fields: Any) -> dict[str, Any]:
    return {
        **dict(zip(KEY, job, strict=True)),
        "train_examples": len(data.train),
        **fields,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
        "budget": asdict(BUDGETS[job[3]]),
    }


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
        (backbone, task, method, setting, seed, config.lr),
        data,
        started,
        recipe=asdict(config),
        first_memory_layer=memory.spec.first_memory_layer,
        dev=report.dev,
        test=report.test,
        best_epoch=report.best_epoch,
        epochs_run=len(report.epochs),
        dev_by_epoch={r.epoch: r.dev for r in report.epochs if r.dev},
        steps=sum(r.steps for r in report.epochs),
        prepare_seconds=round(report.prepare_seconds, 2),
        seconds_to_best=round(report.seconds_to_best, 2),
        train_seconds=round(report.seconds_total, 2),
        trainable_parameters=report.trainable_parameters,
        task_bytes=report.memory_bytes,
    )


def run_one(
    job: tuple[Any, ...], cache_dir: Path, spartan: peers.SpartanConfig | None = None
) -> dict[str, Any]:
    """One job: a method of peers.py through benchmarks/fit.py, or spartan-fast[NAME]: pilot variant NAME."""
    backbone, task, method, setting, seed, lr = job
    if method.startswith(FAST):
        changes = PILOT[method[len(FAST) + 1 : -1]] if method != FAST else {"lr": lr}
        return run_recipe(backbone, task, setting, seed, cache_dir, changes, method=method)
    budget, data = BUDGETS[setting], task_data(task, setting, seed, cache_dir)
    built = peers.build(
        method, backbone, cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=seed, spartan=spartan
    )
    config = FitConfig(
        lr=lr, epochs=budget.epochs, max_length=budget.max_length, eval_every=budget.eval_every, seed=seed
    )
    started = time.perf_counter()
    result = fit(built, data, config)
    return record_of(
        job,
        data,
        started,
        dev=result.dev,
        test=result.test,
        best_epoch=result.best_epoch,
        steps=result.steps,
        train_seconds=round(result.train_seconds, 2),
        median_step_ms=round(statistics.median(result.step_ms), 1),
        trainable_parameters=sum(p.numel() for p in built.model.trainable()),
        task_bytes=built.model.task_bytes(),
    )


def execute(plan: list[tuple[Any, ...]], path: Path, cache_dir: Path, shard: tuple[int, int]) -> None:
    """Run each planned job not yet in the results file."""
    done = {tuple(r[k] for k in KEY) for r in harness.read_records(path)}
    # Shard by (task, seed), not by run: every method of a task and seed runs in the same process, so
    # a benchmark stopped early has all methods for the same tasks and seeds.
    groups = list(dict.fromkeys((job[1], job[4]) for job in plan))
    mine = [job for job in plan if groups.index((job[1], job[4])) % shard[1] == shard[0] and job not in done]
    print(f"{len(mine)} runs to do ({len(plan)} planned, {len(done)} already recorded)", flush=True)
    for number, job in enumerate(mine, 1):
        try:
            record = run_one(job, cache_dir)
        except peers.MethodUnavailable as err:
            record = {**dict(zip(KEY, job, strict=True)), "unavailable": str(err)}
        harness.append_record(path, record)
        test = record.get("test", {})
        print(f"[{number}/{len(mine)}] {job}: test {test} ({record.get('wall_seconds', 0)} s)", flush=True)


def pilot(variants: list[str], tasks: list[str], backbone: str, path: Path, cache_dir: Path) -> None:
    """Each recipe variant on each task, seed 0, dev only (the choice never sees a test split)."""
    done = {(r["backbone"], r["task"], r["variant"]) for r in harness.read_records(path)}
    jobs = [(t, v) for v in variants for t in tasks if (backbone, t, v) not in done]
    print(f"{len(jobs)} pilot runs to do", flush=True)
    for number, (task, name) in enumerate(jobs, 1):
        record = run_recipe(backbone, task, "few", 0, cache_dir, PILOT[name], test=False)
        harness.append_record(path, {**{k: v for k, v in record.items() if k != "test"}, "variant": name})
        print(f"[{number}/{len(jobs)}] {task} {name}: dev {record['dev']} ({record['wall_seconds']} s)")
    table: dict[str, dict[str, float]] = {}
    for record in harness.read_records(path):
        if record["backbone"] == backbone:
            table.setdefault(record["variant"], {})[record["task"]] = 100 * record["dev"]["accuracy"]
    for name, scores in table.items():
        cells = " ".join(f"{t} {v:.1f}" for t, v in scores.items())
        print(f"{name:>24}: {cells} | mean {statistics.mean(scores.values()):.2f}")


def accuracy(record: dict[str, Any]) -> float:
    test = record["test"]
    return float(test.get("accuracy", test.get("pearson", 0.0))) * 100


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread} ({len(values)})"


def or_dash(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def paired_cells(deltas: list[float]) -> tuple[object, ...]:
    """Pairs, mean Δ, std and wins / ties / losses of paired differences."""
    wins, ties = sum(d > 0 for d in deltas), sum(d == 0 for d in deltas)
    std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
    tally = f"{wins} / {ties} / {len(deltas) - wins - ties}"
    return len(deltas), f"{statistics.mean(deltas):+.2f}", f"{std:.2f}", tally


def compare(path: Path, method: str, baselines: Sequence[str]) -> str:
    """Markdown: test accuracy of `method` and each baseline per task, and their paired differences."""
    records = harness.read_records(path)
    score = {(r["task"], r["method"], r["seed"]): accuracy(r) for r in records if "test" in r}
    tasks = [t for t in SUITE if any(k[:2] == (t, method) for k in score)]
    seeds = {t: sorted(k[2] for k in score if k[:2] == (t, method)) for t in tasks}
    deltas: dict[str, list[float]] = {b: [] for b in baselines}
    rows = []
    for task in tasks:
        mine = [score[(task, method, s)] for s in seeds[task]]
        row = [task, mean_std(mine)]
        for base in baselines:
            theirs = [score.get((task, base, s)) for s in seeds[task]]
            paired = [a - b for a, b in zip(mine, theirs, strict=True) if b is not None]
            deltas[base] += paired
            mean = statistics.mean(paired) if paired else None
            row += [mean_std([b for b in theirs if b is not None]), or_dash(mean, "+.2f")]
        rows.append(row)
    averages = {  # over tasks of the mean over seeds; only for a method with every (task, seed)
        m: statistics.mean(statistics.mean(score[(t, m, s)] for s in seeds[t]) for t in tasks)
        for m in (method, *baselines)
        if tasks and all((t, m, s) in score for t in tasks for s in seeds[t])
    }
    ours = averages.get(method)
    average_row = ["**average**", or_dash(ours)]
    for base in baselines:
        theirs = averages.get(base)
        average_row += [
            or_dash(theirs),
            or_dash(None if ours is None or theirs is None else ours - theirs, "+.2f"),
        ]
    head = ("task", method, *(cell for b in baselines for cell in (b, f"Δ vs {b}")))
    spread = [(f"{method} - {b}", *paired_cells(v)) for b, v in deltas.items() if len(v) > 1]
    stats_head = ("paired Δ (points)", "pairs", "mean", "std", "wins / ties / losses")
    return (
        "\n".join([*harness.table(head, [*rows, average_row]), "", *harness.table(stats_head, spread)]) + "\n"
    )


def suite_table(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, float | None]]:
    """Test accuracy (%) per task and method over seeds; the suite average (mean over tasks of the seed
    mean) only for a method that has every task (no partial averages)."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in (r for r in records if "test" in r):
        cells[(record["task"], record["method"])].append(accuracy(record))
    methods = [m for m in METHOD_ORDER if any(method == m for _, method in cells)]
    tasks = sorted({task for task, _ in cells})
    averages = {}
    for m in methods:
        means = [statistics.mean(cells[(t, m)]) for t in tasks if cells.get((t, m))]
        averages[m] = statistics.mean(means) if len(means) == len(tasks) else None
    rows = [(task, *(mean_std(cells.get((task, m), [])) for m in methods)) for task in tasks]
    rows.append(("**average**", *("incomplete" if v is None else f"**{v:.2f}**" for v in averages.values())))
    return harness.table(("task", *methods), rows), averages


def paired(records: list[dict[str, Any]], ours: str = "spartan") -> list[str]:
    """SPARTAN minus each peer on the same task and seed (same few-shot draw, same test subset)."""
    score = {(r["task"], r["seed"], r["method"]): accuracy(r) for r in records if "test" in r}
    rows = []
    for peer in (m for m in METHOD_ORDER if m != ours):
        per_task: dict[str, list[float]] = defaultdict(list)
        for task, seed, method in score:
            if method == peer and (task, seed, ours) in score:
                per_task[task].append(score[(task, seed, ours)] - score[(task, seed, peer)])
        if deltas := [d for values in per_task.values() for d in values]:
            better = sum(statistics.mean(v) > 0 for v in per_task.values())
            rows.append((peer, *paired_cells(deltas), f"{better} of {len(per_task)}"))
    head = (f"{ours} minus", "task-seed pairs", "mean Δ (pts)", "std", "wins / ties / losses", "tasks Δ > 0")
    return harness.table(head, rows)


def lr_search_tables(backbone: str, search: list[dict[str, Any]]) -> list[str]:
    """Dev accuracy per method and grid learning rate; trainable parameters and bytes per task."""
    ordered = sorted(
        (r for r in search if "dev" in r), key=lambda r: (METHOD_ORDER.index(r["method"]), r["lr"])
    )
    lrs = [(r["method"], f"{r['lr']:g}", f"{r['dev']['accuracy'] * 100:.1f}") for r in ordered]
    first = {r["method"]: r for r in reversed(search) if "trainable_parameters" in r}
    firsts = [first[m] for m in METHOD_ORDER if m in first]
    sizes = [
        (r["method"], f"{r['trainable_parameters']:,}", f"{r['task_bytes'] / 2**20:.2f} MiB") for r in firsts
    ]
    lines = [f"### {backbone}: learning-rate search (dev accuracy, one task)", ""]
    lines += [*harness.table(("method", "lr", "dev accuracy %"), lrs), ""]
    lines += ["### trainable parameters and bytes per task", ""]
    return [*lines, *harness.table(("method", "trainable parameters", "bytes per task"), sizes), ""]


def write_report(out: Path) -> None:
    """accuracy.md (tables per backbone and setting) and accuracy.png (suite averages) from the records."""
    backbones = sorted(
        {p.stem.split("_")[-1] for p in out.glob("accuracy_*_*.jsonl") if "lrsearch" not in p.name}
    )
    lines = ["# Accuracy: SPARTAN vs peers on one frozen backbone", ""]
    plot: dict[str, dict[str, float | None]] = {}
    for backbone in backbones:
        for setting, title in TITLES.items():
            if records := harness.read_records(out / f"accuracy_{setting}_{backbone}.jsonl"):
                rows, plot[f"{backbone} {setting}"] = suite_table(records)
                lines += [f"## {backbone}, {title}", "", "test accuracy %, mean ± std (seeds)", "", *rows, ""]
                lines += ["Paired differences (same task, seed, training draw and test subset):", ""]
                lines += [*paired(records), ""]
        if search := harness.read_records(out / f"accuracy_lrsearch_{backbone}.jsonl"):
            lines += lr_search_tables(backbone, search)
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    if plot:
        draw(plot, out / "accuracy.png")


def draw(plot: dict[str, dict[str, float | None]], path: Path) -> None:
    fig, ax = harness.pyplot().subplots(figsize=(9, 4))
    groups = list(plot)
    methods = [m for m in METHOD_ORDER if any(plot[g].get(m) is not None for g in groups)]
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [plot[g].get(method) or 0.0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=method)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(groups))], groups)
    low = min((v for g in groups for v in plot[g].values() if v), default=0.0)
    title = "SPARTAN vs peers (mean over tasks of the seed mean)"
    ax.set(ylabel="suite average test accuracy %", ylim=(max(0.0, low - 10), None), title=title)
    ax.legend(ncol=4, fontsize=8)
    harness.save_figure(fig, path)


def chosen_lrs(path: Path, backbone: str) -> dict[str, float]:
    """Per method, the grid learning rate with the best dev score in the lr-search records."""
    best: dict[str, tuple[float, float]] = {}
    for record in harness.read_records(path):
        if record["backbone"] == backbone and "dev" in record:
            value = record["dev"].get("accuracy", record["dev"].get("pearson", 0.0))
            if record["method"] not in best or value > best[record["method"]][0]:
                best[record["method"]] = (value, record["lr"])
    return {method: lr for method, (_, lr) in best.items()}


def parse_shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    return int(index), int(count)


def results_file(kind: str, backbone: str, out: Path) -> Path:
    return out / f"accuracy_{kind}_{backbone}.jsonl"


def main() -> None:
    parser = harness.parser(__doc__, harness.RESULTS)
    parser.add_argument("step", choices=("lr-search", "pilot", "run", "compare", "report"))
    parser.add_argument("--backbone", default="minilm")
    parser.add_argument("--setting", choices=("few", "full"), default="few")
    parser.add_argument("--task", default="banking77", help="lr-search: the one task whose dev split chooses")
    parser.add_argument("--tasks", nargs="+", default=list(SUITE))
    parser.add_argument("--methods", nargs="+", default=[m for m in peers.TRAINABLE_METHODS if m != "ia3"])
    parser.add_argument("--variants", nargs="+", default=list(PILOT), help="pilot: recipe variants")
    parser.add_argument("--against", nargs="+", default=["spartan", "pfeiffer"], help="compare: baselines")
    parser.add_argument("--method", default=FAST, help="compare: the method compared (default: the recipe)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--shard", type=parse_shard, default=(0, 1))
    parser.add_argument("--lrs-from", help="use the learning rates chosen by another backbone's lr-search")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    # The recipe's own learning rates, not searched.
    recipe_lrs = {FAST: FEW_SHOT_LR, **{f"{FAST}[{name}]": changes["lr"] for name, changes in PILOT.items()}}
    if unknown := set(args.methods) - {*peers.METHODS, *recipe_lrs}:
        parser.error(f"unknown methods {sorted(unknown)}")
    args.setting = "smoke" if args.smoke else args.setting
    if args.step == "report":
        write_report(args.out)
    elif args.step == "compare":  # the few-shot recipe against today's SPARTAN (and peers), paired
        table = compare(results_file(args.setting, args.backbone, args.out), args.method, args.against)
        if args.method == FAST:
            (args.out / f"accuracy_fast_{args.backbone}.md").write_text(table)
        print(table)
    elif args.step == "pilot":
        path = results_file("pilot", args.backbone, args.out)
        pilot(args.variants, args.tasks, args.backbone, path, cache_dir)
    elif args.step == "lr-search":
        path = results_file("lrsearch", args.backbone, args.out)
        grid = {m: (CENTRE_LR[m] / 3, CENTRE_LR[m], CENTRE_LR[m] * 3) for m in args.methods}
        plan = [(args.backbone, args.task, m, args.setting, 0, lr) for m, lrs in grid.items() for lr in lrs]
        execute(plan, path, cache_dir, args.shard)
        print(json.dumps(chosen_lrs(path, args.backbone)))
    else:
        lrs_from = args.lrs_from or args.backbone
        source = results_file("lrsearch", lrs_from, args.out)
        lrs = {**(CENTRE_LR if args.smoke else chosen_lrs(source, lrs_from)), **recipe_lrs}
        if missing := [m for m in args.methods if m not in lrs]:
            parser.error(f"no learning rate chosen yet for {missing}: run the lr-search step first")
        # Seed outermost: a run cut short still covers every task and method with the first seeds.
        jobs = itertools.product(args.seeds, args.tasks, args.methods)
        plan = [(args.backbone, task, m, args.setting, seed, lrs[m]) for seed, task, m in jobs]
        execute(plan, results_file(args.setting, args.backbone, args.out), cache_dir, args.shard)
        meta = dict(date=date.today().isoformat(), machine=platform.platform(), command=" ".join(sys.argv))
        harness.append_record(args.out / "accuracy_runs_log.jsonl", meta)


if __name__ == "__main__":
    main()
