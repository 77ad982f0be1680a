"""Tables and a plot from the accuracy benchmark's JSONL records (benchmarks/bench_accuracy.py report)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from benchmarks import harness

METHOD_ORDER = ("head", "spartan", "pfeiffer", "houlsby", "lora", "ia3", "bitfit", "full")
SETTINGS = (
    ("few", "few-shot (200 training examples)"),
    ("full", "training data up to 5,000 examples per task (all of TREC; a fixed subset elsewhere)"),
    ("smoke", "smoke run (tiny data: checks the pipeline, not accuracy)"),
)


read = harness.read_records


def accuracy(record: dict[str, Any]) -> float:
    test = record["test"]
    return float(test.get("accuracy", test.get("pearson", 0.0))) * 100


def grouped(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[float]]:
    """(task, method) -> test accuracy (%) of each seed."""
    cells: dict[tuple[str, str], list[float]] = defaultdict(list)
    for record in records:
        if "test" in record:
            cells[(record["task"], record["method"])].append(accuracy(record))
    return cells


def mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    spread = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.1f}{spread} ({len(values)})"


def suite_average(cells: dict[tuple[str, str], list[float]], method: str, tasks: list[str]) -> float | None:
    """Mean over tasks of the seed-mean; None unless the method has every task (no partial averages)."""
    means = [statistics.mean(cells[(t, method)]) for t in tasks if cells.get((t, method))]
    return statistics.mean(means) if len(means) == len(tasks) else None


def table(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, float | None]]:
    cells = grouped(records)
    methods = [m for m in METHOD_ORDER if any(method == m for _, method in cells)]
    tasks = sorted({task for task, _ in cells})
    lines = ["| task | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(mean_std(cells.get((task, m), [])) for m in methods) + " |")
    averages = {m: suite_average(cells, m, tasks) for m in methods}
    lines.append(
        "| **average** | "
        + " | ".join(f"**{v:.2f}**" if v is not None else "incomplete" for v in averages.values())
        + " |"
    )
    return lines, averages


def paired(records: list[dict[str, Any]], ours: str = "spartan") -> list[str]:
    """SPARTAN minus each peer on the same task and seed (same few-shot draw, same test subset)."""
    score = {(r["task"], r["seed"], r["method"]): accuracy(r) for r in records if "test" in r}
    lines = [
        f"| {ours} minus | task-seed pairs | mean Δ (pts) | std | wins / ties / losses | tasks Δ > 0 |",
        "|---|---|---|---|---|---|",
    ]
    for peer in (m for m in METHOD_ORDER if m != ours):
        pairs = [
            (task, score[(task, seed, ours)] - score[(task, seed, peer)])
            for (task, seed, method) in score
            if method == peer and (task, seed, ours) in score
        ]
        if not pairs:
            continue
        deltas = [d for _, d in pairs]
        per_task: dict[str, list[float]] = defaultdict(list)
        for task, delta in pairs:
            per_task[task].append(delta)
        better = sum(statistics.mean(v) > 0 for v in per_task.values())
        wins, ties = sum(d > 0 for d in deltas), sum(d == 0 for d in deltas)
        spread = statistics.stdev(deltas) if len(deltas) > 1 else 0.0
        lines.append(
            f"| {peer} | {len(deltas)} | {statistics.mean(deltas):+.2f} | {spread:.2f} | "
            f"{wins} / {ties} / {len(deltas) - wins - ties} | {better} of {len(per_task)} |"
        )
    return lines


def sizes(records: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, dict[str, Any]] = {}
    for record in records:
        if "trainable_parameters" in record and record["method"] not in seen:
            seen[record["method"]] = record
    lines = ["| method | trainable parameters | bytes per task |", "|---|---|---|"]
    for method in (m for m in METHOD_ORDER if m in seen):
        record = seen[method]
        lines.append(
            f"| {method} | {record['trainable_parameters']:,} | {record['task_bytes'] / 2**20:.2f} MiB |"
        )
    return lines


def write_report(out: Path) -> None:
    backbones = sorted(
        {p.stem.split("_")[-1] for p in out.glob("accuracy_*_*.jsonl") if "lrsearch" not in p.name}
    )
    lines = ["# Accuracy: SPARTAN vs peers on one frozen backbone", ""]
    plot: dict[str, dict[str, float | None]] = {}
    for backbone in backbones:
        for setting, title in SETTINGS:
            records = read(out / f"accuracy_{setting}_{backbone}.jsonl")
            if not records:
                continue
            rows, averages = table(records)
            plot[f"{backbone} {setting}"] = averages
            lines += [f"## {backbone}, {title}", "", "test accuracy %, mean ± std (seeds)", "", *rows, ""]
            lines += ["Paired differences (same task, seed, training draw and test subset):", ""]
            lines += [*paired(records), ""]
        search = read(out / f"accuracy_lrsearch_{backbone}.jsonl")
        if search:
            lines += [
                f"### {backbone}: learning-rate search (dev accuracy, one task)",
                "",
                *lr_table(search),
                "",
            ]
            lines += ["### trainable parameters and bytes per task", "", *sizes(search), ""]
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")
    if plot:
        draw(plot, out / "accuracy.png")


def lr_table(records: list[dict[str, Any]]) -> list[str]:
    lines = ["| method | lr | dev accuracy % |", "|---|---|---|"]
    for record in sorted(records, key=lambda r: (METHOD_ORDER.index(r["method"]), r["lr"])):
        if "dev" in record:
            lines.append(f"| {record['method']} | {record['lr']:g} | {record['dev']['accuracy'] * 100:.1f} |")
    return lines


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
    ax.set_ylabel("suite average test accuracy %")
    low = min((v for g in groups for v in plot[g].values() if v), default=0.0)
    ax.set_ylim(max(0.0, low - 10), None)
    ax.legend(ncol=4, fontsize=8)
    ax.set_title("SPARTAN vs peers (mean over tasks of the seed mean)")
    harness.save_figure(fig, path, dpi=120)
