"""Tables and a plot from the accuracy benchmark's JSONL records (benchmarks/bench_accuracy.py report)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks import harness

METHOD_ORDER = ("head", "spartan", "pfeiffer", "houlsby", "lora", "ia3", "bitfit", "full")
SETTINGS = (
    ("few", "few-shot (200 training examples)"),
    ("full", "training data up to 5,000 examples per task (all of TREC; a fixed subset elsewhere)"),
    ("smoke", "smoke run (tiny data: checks the pipeline, not accuracy)"),
)


def accuracy(record: dict[str, Any]) -> float:
    test = record["test"]
    return float(test.get("accuracy", test.get("pearson", 0.0))) * 100


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread} ({len(values)})"


def table(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, float | None]]:
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
    rows.append(
        ("**average**", *(f"**{v:.2f}**" if v is not None else "incomplete" for v in averages.values()))
    )
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
        deltas = [d for values in per_task.values() for d in values]
        if not deltas:
            continue
        wins, ties = sum(d > 0 for d in deltas), sum(d == 0 for d in deltas)
        better = sum(statistics.mean(v) > 0 for v in per_task.values())
        std = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        record = f"{wins} / {ties} / {len(deltas) - wins - ties}"
        rows.append((peer, len(deltas), f"{statistics.mean(deltas):+.2f}", f"{std:.2f}", record,
                     f"{better} of {len(per_task)}"))  # fmt: skip
    head = (f"{ours} minus", "task-seed pairs", "mean Δ (pts)", "std", "wins / ties / losses", "tasks Δ > 0")
    return harness.table(head, rows)


def write_report(out: Path) -> None:
    backbones = sorted(
        {p.stem.split("_")[-1] for p in out.glob("accuracy_*_*.jsonl") if "lrsearch" not in p.name}
    )
    lines = ["# Accuracy: SPARTAN vs peers on one frozen backbone", ""]
    plot: dict[str, dict[str, float | None]] = {}
    for backbone in backbones:
        for setting, title in SETTINGS:
            if records := harness.read_records(out / f"accuracy_{setting}_{backbone}.jsonl"):
                rows, plot[f"{backbone} {setting}"] = table(records)
                lines += [f"## {backbone}, {title}", "", "test accuracy %, mean ± std (seeds)", "", *rows, ""]
                lines += ["Paired differences (same task, seed, training draw and test subset):", ""]
                lines += [*paired(records), ""]
        if search := harness.read_records(out / f"accuracy_lrsearch_{backbone}.jsonl"):
            ordered = sorted(
                (r for r in search if "dev" in r), key=lambda r: (METHOD_ORDER.index(r["method"]), r["lr"])
            )
            lrs = [(r["method"], f"{r['lr']:g}", f"{r['dev']['accuracy'] * 100:.1f}") for r in ordered]
            first = {r["method"]: r for r in reversed(search) if "trainable_parameters" in r}
            sizes = [(m, f"{first[m]['trainable_parameters']:,}", f"{first[m]['task_bytes'] / 2**20:.2f} MiB")
                     for m in METHOD_ORDER if m in first]  # fmt: skip
            lines += [f"### {backbone}: learning-rate search (dev accuracy, one task)", ""]
            lines += [*harness.table(("method", "lr", "dev accuracy %"), lrs), ""]
            lines += ["### trainable parameters and bytes per task", ""]
            lines += [*harness.table(("method", "trainable parameters", "bytes per task"), sizes), ""]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    if plot:
        draw(plot, out / "accuracy.png")


def draw(plot: dict[str, dict[str, float | None]], path: Path) -> None:
    plt = harness.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    groups = list(plot)
    methods = [m for m in METHOD_ORDER if any(plot[g].get(m) is not None for g in groups)]
    width = 0.8 / max(1, len(methods))
    for i, method in enumerate(methods):
        values = [plot[g].get(method) or 0.0 for g in groups]
        ax.bar([x + i * width for x in range(len(groups))], values, width, label=method)
    ax.set_xticks([x + width * (len(methods) - 1) / 2 for x in range(len(groups))], groups)
    low = min((v for g in groups for v in plot[g].values() if v), default=0.0)
    ax.set(ylabel="suite average test accuracy %", ylim=(max(0.0, low - 10), None),
           title="SPARTAN vs peers (mean over tasks of the seed mean)")  # fmt: skip
    ax.legend(ncol=4, fontsize=8)
    harness.save_figure(fig, path, dpi=120)
