"""Few-shot training speed of SPARTAN against its peers: per epoch, and from the start to the kept epoch.

Data: the accuracy benchmark's few-shot setting (benchmarks/bench_accuracy.py): 200 training examples,
batch 16 (13 steps per epoch), max length 64. Peers come from their own libraries (benchmarks/peers.py).

--mode epoch (default; docs/results/speed_training.*): one epoch's cost. Per (backbone, dataset) every
contender (spartan, pfeiffer, houlsby, lora, head, full) is built in one process, warmed up with 2 steps,
then trains one epoch per round on the very same batches (fit.py's first permutation, tokenised once
beforehand), contenders rotated from round to round (harness rule); ratios are taken per round. One step =
forward + loss + backward + AdamW + scheduler, as benchmarks/fit.py. Peak memory: a fresh process per
contender with MALLOC_MMAP_THRESHOLD_ pinned low; one forward + backward first (one-time costs), then the
RSS high-water mark is reset and one epoch trained: peak = VmHWM - RSS before it (benchmarks/procmem.py).

--mode to-kept (docs/results/speed_training_kept.*): wall time from the start of training to the end of
the kept epoch, the issue-14 measure. spartan-fast is the shipped few-shot recipe (few_shot_config through
app.training.trainer.train_memory: tokenising, running the layers below the memories once, every epoch and
dev scoring up to the kept one); the others train under the protocol's own budget through
benchmarks/fit.py (10 epochs, dev at 5 and 10; the time to the end of the kept epoch's dev scoring is read
by timing fit's calls of `score`). One fresh process per run (the build is not timed), rotated order per
round, peak memory = VmHWM during training - RSS after the build. Goal: suite time <= 0.5 x Pfeiffer's.

    .venv-peers/bin/python benchmarks/bench_training_speed.py                  # per-epoch
    .venv-peers/bin/python benchmarks/bench_training_speed.py --mode to-kept   # 9 tasks, seed 0, 3 rounds
    .venv-peers/bin/python benchmarks/bench_training_speed.py --smoke          # both modes, tiny (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.fit as fit_module
from app.settings import Settings
from app.training.datasets import TaskData
from benchmarks import harness
from benchmarks.bench_accuracy import BUDGETS, CENTRE_LR, FAST, SUITE, run_recipe, spartan_encoder, task_data
from benchmarks.fit import FitConfig, encode, loss_of, targets
from benchmarks.peers import BACKBONE_NAMES, Built, MethodUnavailable, TaskModel, build
from benchmarks.procmem import reset_peak, status_mib

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
CONTENDERS = ("spartan", "pfeiffer", "houlsby", "lora", "head", "full")
SMOKE_CONTENDERS = ("spartan", "pfeiffer", "lora")
ADAPTERS = ("pfeiffer", "houlsby")
DATASETS = ("banking77", "20ng")
GOAL = 0.75  # per epoch: SPARTAN <= 0.75 x adapters (the paper's "34% faster")
KEPT_GOAL = 0.5  # issue 14: time to the kept epoch <= 0.5 x Pfeiffer's
WARMUP_STEPS = 2
MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed buffers go back to the OS: a true baseline
COLORS = {"spartan": "#1f77b4", "pfeiffer": "#ff7f0e", "houlsby": "#d62728", "lora": "#2ca02c"}


@dataclass(frozen=True)
class Workload:
    examples: int
    batch_size: int
    max_length: int
    seed: int = 0
    setting: str = "few"  # bench_accuracy's data setting the examples come from

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.examples // self.batch_size)


FULL_WORKLOAD = Workload(examples=200, batch_size=16, max_length=BUDGETS["few"].max_length)
SMOKE_WORKLOAD = Workload(examples=16, batch_size=8, max_length=16, setting="smoke")


@dataclass
class Batch:
    encoding: dict[str, torch.Tensor]
    target: torch.Tensor

    def shape(self) -> dict[str, int]:
        ids, mask = self.encoding["input_ids"], self.encoding["attention_mask"]
        return {"rows": int(ids.shape[0]), "padded_length": int(ids.shape[1]), "tokens": int(mask.sum())}


@dataclass
class Contender:
    name: str
    built: Built
    data: TaskData
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model(self) -> TaskModel:
        return self.built.model


def make_contender(
    name: str, backbone: str, data: TaskData, workload: Workload, cache_dir: Path
) -> Contender:
    built = build(name, backbone, cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=workload.seed)
    built.model.train()
    optimizer = torch.optim.AdamW(built.model.trainable(), lr=CENTRE_LR[name], weight_decay=0.01)
    total = workload.steps_per_epoch * BUDGETS["few"].epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    return Contender(name, built, data, optimizer, schedule)


def make_batches(built: Built, data: TaskData, workload: Workload) -> list[Batch]:
    """The first epoch's batches of benchmarks/fit.py (same permutation), tokenised once."""
    order = np.random.default_rng(workload.seed).permutation(len(data.train))[: workload.examples]
    batches = []
    for start in range(0, len(order), workload.batch_size):
        examples = [data.train[i] for i in order[start : start + workload.batch_size]]
        batches.append(
            Batch(encode(built, examples, data.has_pairs, workload.max_length), targets(data, examples))
        )
    return batches


def train_epoch(contender: Contender, batches: list[Batch]) -> dict[str, Any]:
    """One epoch as benchmarks/fit.py trains it; per step, (forward, backward, optimiser) milliseconds."""
    phases = []
    for batch in batches:
        began = time.perf_counter()
        loss = loss_of(contender.data, contender.model(batch.encoding), batch.target)
        forward_done = time.perf_counter()
        contender.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        contender.optimizer.step()
        contender.schedule.step()
        ended = time.perf_counter()
        phases.append(
            [
                1000 * (forward_done - began),
                1000 * (backward_done - forward_done),
                1000 * (ended - backward_done),
            ]
        )
    steps = [sum(p) for p in phases]
    split = {
        f"{name}_ms": [p[i] for p in phases] for i, name in enumerate(("forward", "backward", "optimizer"))
    }
    return {"step_ms": steps, **split, "epoch_s": sum(steps) / 1000}


def time_group(
    backbone: str, dataset: str, names: list[str], workload: Workload, rounds: int, cache_dir: Path
) -> list[dict[str, Any]]:
    """Build every contender of one (backbone, dataset) and time them in rotated rounds."""
    data = task_data(dataset, workload.setting, workload.seed, cache_dir)
    contenders, rows = [], {}
    for name in names:
        try:
            contenders.append(make_contender(name, backbone, data, workload, cache_dir))
        except MethodUnavailable as err:
            rows[name] = {"available": False, "reason": str(err).splitlines()[0]}
    if contenders:
        batches = make_batches(contenders[0].built, data, workload)
        began = time.perf_counter()
        make_batches(contenders[0].built, data, workload)
        tokenize_s = time.perf_counter() - began
        for contender in contenders:
            train_epoch(contender, batches[:WARMUP_STEPS])
        for number in range(rounds):
            shift = number % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender.rounds.append(train_epoch(contender, batches))
            print(
                f"{backbone}/{dataset} round {number + 1}/{rounds}, load {os.getloadavg()[0]:.2f}", flush=True
            )
    for contender in contenders:
        rounds_ = contender.rounds
        rows[contender.name] = {
            "available": True,
            "lr": CENTRE_LR[contender.name],
            "trainable_parameters": sum(p.numel() for p in contender.model.trainable()),
            "task_bytes": contender.model.task_bytes(),
            "step_ms": harness.spread([ms for r in rounds_ for ms in r["step_ms"]]),
            "phase_ms": {
                phase: statistics.median(ms for r in rounds_ for ms in r[f"{phase}_ms"])
                for phase in ("forward", "backward", "optimizer")
            },
            "epoch_s": harness.spread([r["epoch_s"] for r in rounds_]),
            "tokenize_epoch_s": tokenize_s,
            "batches": [b.shape() for b in batches],
            "rounds": rounds_,
        }
    del contenders
    gc.collect()
    return [{"backbone": backbone, "dataset": dataset, "contender": n, **rows[n]} for n in names]


def saved_activation_bytes(contender: Contender, batch: Batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward on one forward (parameters excluded)."""
    params = {
        t.untyped_storage().data_ptr() for t in [*contender.model.parameters(), *contender.model.buffers()]
    }
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without a plain storage
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(contender.data, contender.model(batch.encoding), batch.target)
    return sum(seen.values())


def epoch_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one contender's training epoch, measured in this (fresh) process."""
    workload, cache_dir = Workload(**job["workload"]), Path(job["cache_dir"])
    data = task_data(job["dataset"], workload.setting, workload.seed, cache_dir)
    contender = make_contender(job["contender"], job["backbone"], data, workload, cache_dir)
    batches = make_batches(contender.built, data, workload)
    # One forward + backward first (no optimiser step, so AdamW's state stays unallocated): one-time
    # process costs (autograd's worker, kernel caches) are not this method's training.
    loss_of(data, contender.model(batches[0].encoding), batches[0].target).backward()
    contender.model.zero_grad(set_to_none=True)
    gc.collect()
    rss = status_mib("VmRSS")
    resettable = reset_peak()
    train_epoch(contender, batches)
    state = [t for s in contender.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    grads = [p.grad for p in contender.model.parameters() if p.grad is not None]
    longest = max(batches, key=lambda b: b.shape()["rows"] * b.shape()["padded_length"])
    return {
        "rss_after_build_mib": rss,
        "peak_mib": max(0.0, status_mib("VmHWM") - rss) if resettable else None,
        "hwm_reset": resettable,
        "optimizer_state_mib": sum(t.numel() * t.element_size() for t in state) / 2**20,
        "gradient_mib": sum(g.numel() * g.element_size() for g in grads) / 2**20,
        "saved_activations_mib": saved_activation_bytes(contender, longest) / 2**20,
    }


def child(worker: str, job: dict[str, Any], threads: int) -> dict[str, Any]:
    """One measurement in a fresh process of this script (its last stdout line is the JSON result)."""
    command = [sys.executable, __file__, "--threads", str(threads), f"--{worker}", json.dumps(job)]
    try:
        result: dict[str, Any] = harness.run_child(command, timeout_s=3600, env=MALLOC)
    except (RuntimeError, ValueError) as err:
        return {"error": str(err).strip().splitlines()[-1]}
    return result


def measure_epoch_memory(
    rows: list[dict[str, Any]], workload: Workload, threads: int, cache_dir: Path
) -> None:
    for row in rows:
        if row["available"]:
            job = {key: row[key] for key in ("backbone", "dataset", "contender")}
            row["memory"] = child(
                "epoch-memory", {**job, "workload": workload.__dict__, "cache_dir": str(cache_dir)}, threads
            )
            print(f"memory {job}: {row['memory']}", flush=True)


def epoch_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: a contender's epoch time / a reference's in the same round (same batches)."""
    result = []
    for backbone, dataset in dict.fromkeys((r["backbone"], r["dataset"]) for r in rows):
        group = {
            r["contender"]: r
            for r in rows
            if (r["backbone"], r["dataset"]) == (backbone, dataset) and r["available"]
        }
        pairs = [("spartan", ref) for ref in group if ref != "spartan"]
        pairs += [(name, "pfeiffer") for name in group if name not in ("spartan", "pfeiffer")]
        for name, reference in pairs:
            if name in group and reference in group:
                rounds = zip(group[name]["rounds"], group[reference]["rounds"], strict=True)
                per_round = [a["epoch_s"] / b["epoch_s"] for a, b in rounds]
                result.append(
                    {
                        "backbone": backbone,
                        "dataset": dataset,
                        "contender": name,
                        "reference": reference,
                        "per_round": per_round,
                        **harness.spread(per_round),
                    }
                )
    return result


def render_epoch(report: dict[str, Any]) -> str:
    env, work, fmt = report["environment"], report["workload"], harness.fmt_spread
    vs = {
        (r["backbone"], r["dataset"], r["contender"]): r
        for r in report["ratios"]
        if r["reference"] == "pfeiffer"
    }
    lines = [
        f"# Training speed: SPARTAN vs adapters vs LoRA ({report['date'][:10]})",
        "",
        f"Command: `{report['command']}`. {env['cpu']} ({env['cpu_count']} CPUs), {env['platform']}, "
        f"torch threads {env['torch_threads']}, {env['packages']}; load {report['load_before']:.2f} before, "
        f"{report['load_after']:.2f} after.",
        "",
        *harness.load_warning(
            env["cpu_count"], report["load_after"], "the machine was busy: times are inflated"
        ),
        f"{work['examples']} examples, batch {work['batch_size']} ({work['steps_per_epoch']} steps per "
        f"epoch), length {work['max_length']}, the same batches for every contender, {report['rounds']} "
        "rounds (one epoch each, contenders rotated). step ms: median [min, max] over every step; fwd / bwd "
        "/ opt: medians of each phase; s/epoch: median [min, max] over rounds; peak MiB: one epoch on top of "
        f"the built model ({report['memory_method']}); saved act.: tensors kept for backward on the longest "
        "batch; vs pfeiffer: per-round epoch-time ratio.",
        "",
        "| backbone | dataset | contender | step ms | fwd / bwd / opt ms | s/epoch | peak MiB "
        "| saved act. MiB | params | bytes/task | vs pfeiffer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["runs"]:
        head = f"| {row['backbone']} | {row['dataset']} | {row['contender']} "
        if not row["available"]:
            lines.append(head + f"| unavailable: {row['reason'][:60]} |" + " — |" * 7)
            continue
        memory, phase = row.get("memory") or {}, row["phase_ms"]
        mib = [
            "n/a" if memory.get(k) is None else f"{memory[k]:.0f}"
            for k in ("peak_mib", "saved_activations_mib")
        ]
        ratio = vs.get((row["backbone"], row["dataset"], row["contender"]))
        shown = fmt(ratio, 2) if ratio else "1" if row["contender"] == "pfeiffer" else "—"
        lines.append(
            head + f"| {fmt(row['step_ms'], 0)} | {phase['forward']:.0f} / {phase['backward']:.0f} / "
            f"{phase['optimizer']:.0f} | {fmt(row['epoch_s'], 2)} | {' | '.join(mib)} | "
            f"{row['trainable_parameters']:,} | {row['task_bytes']:,} | {shown} |"
        )
    lines += ["", f"## Goal: SPARTAN epoch time <= {GOAL} x adapters", ""]
    lines += [
        f"- {g['backbone']}/{g['dataset']} vs {g['adapter']}: {fmt(g, 2)}: {'met' if g['met'] else 'NOT met'}"
        for g in report["goal"]
    ] or ["- no adapter ran"]
    lines += [
        "",
        "Why: every method with trainable parts inside the layers back-propagates through the whole "
        "frozen backbone; their modules cost 1-2.5% of a layer (docs/RESULTS.md section 3). The "
        "few-shot recipe (--mode to-kept) avoids it: memories in the top layers only.",
    ]
    return "\n".join(lines) + "\n"


def plot_epoch(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in report["runs"]))
    fig, axes = plt.subplots(1, len(backbones), figsize=(7 * len(backbones), 5), squeeze=False)
    for axis, backbone in zip(axes[0], backbones, strict=True):
        runs = [r for r in report["runs"] if r["backbone"] == backbone and r["available"]]
        datasets, names = (
            list(dict.fromkeys(r["dataset"] for r in runs)),
            list(dict.fromkeys(r["contender"] for r in runs)),
        )
        width = 0.8 / max(1, len(names))
        for j, name in enumerate(names):
            for i, dataset in enumerate(datasets):
                row = next((r for r in runs if (r["dataset"], r["contender"]) == (dataset, name)), None)
                if row:
                    per_step = [1000 * r["epoch_s"] / len(r["step_ms"]) for r in row["rounds"]]
                    mid = statistics.median(per_step)
                    axis.bar(
                        i + (j - (len(names) - 1) / 2) * width,
                        mid,
                        width,
                        color=COLORS.get(name, "#777777"),
                        label=name if i == 0 else None,
                        yerr=[[mid - min(per_step)], [max(per_step) - mid]],
                    )
        axis.set_xticks(range(len(datasets)), datasets)
        axis.set_ylabel("ms per training step (epoch mean)")
        axis.set_title(f"{backbone}: median over {report['rounds']} rounds, whiskers min..max")
        axis.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


# --- from the start to the kept epoch ---------------------------------------------------------------------


@contextlib.contextmanager
def scoring_times() -> Iterator[list[float]]:
    """When benchmarks.fit.fit finished each scoring (its dev scorings in order, then the test's):
    fit's module-level `score` is wrapped for the call; fit itself is unchanged."""
    stamps: list[float] = []
    original = fit_module.score

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        result = original(*args, **kwargs)
        stamps.append(time.perf_counter())
        return result

    fit_module.score = timed
    try:
        yield stamps
    finally:
        fit_module.score = original


def kept_run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run, in this (fresh) process: time to the kept epoch, total, peak memory, scores."""
    cache_dir, setting, seed, name = Path(job["cache_dir"]), job["setting"], job["seed"], job["contender"]
    budget = BUDGETS[setting]
    data = task_data(job["task"], setting, seed, cache_dir)  # read before the baseline (cached)
    if name == FAST:
        spartan_encoder(job["backbone"], cache_dir)  # the build, before the baseline (cached)
    else:
        built = build(
            name, job["backbone"], cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=seed
        )
        every, length = budget.eval_every, budget.max_length
        config = FitConfig(job["lr"], budget.epochs, max_length=length, eval_every=every, seed=seed)
    rss, resettable = status_mib("VmRSS"), reset_peak()
    if name == FAST:
        record = run_recipe(job["backbone"], job["task"], setting, seed, cache_dir, {})
        kept_s, total_s, kept = record["seconds_to_best"], record["train_seconds"], record["best_epoch"]
        evaluated, dev, test = sorted(int(e) for e in record["dev_by_epoch"]), record["dev"], record["test"]
    else:
        with scoring_times() as stamps:
            began = time.perf_counter()
            result = fit_module.fit(built, data, config)
        evaluated = [
            e for e in range(1, budget.epochs + 1) if e % budget.eval_every == 0 or e == budget.epochs
        ]
        kept, dev, test = result.best_epoch, result.dev, result.test
        kept_s, total_s = stamps[evaluated.index(kept)] - began, stamps[len(evaluated) - 1] - began
    return {
        "time_to_kept_s": kept_s,
        "total_s": total_s,
        "kept_epoch": kept,
        "dev_epochs": evaluated,
        "dev": dev,
        "test": test,
        "peak_mib": status_mib("VmHWM") - rss if resettable else None,
    }


def time_to_kept(args: argparse.Namespace, cache_dir: Path) -> list[dict[str, Any]]:
    """Every (task, seed) x contender, once per round, each run in a fresh process, order rotated."""
    names, runs = args.contenders or [FAST, "pfeiffer"], []
    for number in range(args.rounds):
        for task in args.tasks:
            for seed in args.seeds:
                for name in names[number % len(names) :] + names[: number % len(names)]:
                    job = {
                        "backbone": args.backbones[0],
                        "task": task,
                        "seed": seed,
                        "contender": name,
                        "setting": "smoke" if args.smoke else "few",
                        "lr": CENTRE_LR.get(name),  # spartan-fast: its recipe's
                        "cache_dir": str(cache_dir),
                    }
                    runs.append({**job, "round": number, **child("kept-worker", job, args.threads)})
                    print(f"round {number + 1}: {task}/{seed}/{name}: {runs[-1]}", flush=True)
    return runs


def kept_summary(runs: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per task and contender: medians over rounds; per round, each contender's suite time and its
    ratio to the reference's (same round, so the same machine state)."""
    ok = [r for r in runs if "error" not in r]
    names = list(dict.fromkeys(r["contender"] for r in ok))
    cells: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(r["task"] for r in ok):
        for name in names:
            mine = [r for r in ok if (r["task"], r["contender"]) == (task, name)]
            if mine:
                cells.setdefault(task, {})[name] = {
                    "time_to_kept_s": harness.spread([r["time_to_kept_s"] for r in mine]),
                    "total_s": harness.spread([r["total_s"] for r in mine]),
                    "peak_mib": max((r["peak_mib"] for r in mine if r["peak_mib"] is not None), default=None),
                    "kept_epochs": sorted({r["kept_epoch"] for r in mine}),
                    "test_accuracy": statistics.mean(100 * r["test"].get("accuracy", 0.0) for r in mine),
                }
        theirs = {
            (r["round"], r["seed"]): r["time_to_kept_s"]
            for r in ok
            if (r["task"], r["contender"]) == (task, reference)
        }
        for name in names:
            mine = [r for r in ok if (r["task"], r["contender"]) == (task, name)]
            per_round = [
                r["time_to_kept_s"] / theirs[key] for r in mine if (key := (r["round"], r["seed"])) in theirs
            ]
            if per_round and name != reference:
                cells[task][name]["ratio"] = harness.spread(per_round)
    suite: dict[str, list[float]] = {name: [] for name in names}
    for number in sorted({r["round"] for r in ok}):
        for name in names:
            suite[name].append(
                sum(r["time_to_kept_s"] for r in ok if (r["round"], r["contender"]) == (number, name))
            )
    ratios = {
        n: harness.spread([a / b for a, b in zip(suite[n], suite[reference], strict=True)])
        for n in names
        if n != reference and reference in suite
    }
    return {
        "cells": cells,
        "suite_s": {n: harness.spread(v) for n, v in suite.items() if v},
        "suite_ratio": ratios,
    }


def render_kept(report: dict[str, Any]) -> str:
    summary, ref, fmt = report["summary"], report["reference"], harness.fmt_spread
    names = list(summary["suite_s"])
    lines = [
        f"# Few-shot training: wall time from the start to the kept epoch ({report['date'][:10]})",
        "",
        f"Command: `{report['command']}`; {report['environment']['cpu']}, torch threads "
        f"{report['environment']['torch_threads']}; load {report['load_before']:.2f} before, "
        f"{report['load_after']:.2f} after. Seeds {report['seeds']}, {report['rounds']} rounds, one fresh "
        "process per run. Seconds: median [min, max] over rounds, from the start of training (the build "
        "excluded) to the end of the kept epoch's dev scoring; total: to the end of the last dev scoring. "
        "Peak MiB: VmHWM during training - RSS after the build (max over rounds).",
        "",
        *harness.load_warning(
            report["environment"]["cpu_count"], report["load_after"], "the machine was busy"
        ),
        "| task | "
        + " | ".join(f"{n} s to kept | {n} total s | {n} peak MiB | {n} kept" for n in names)
        + f" | to kept vs {ref} |",
        "|---" * (2 + 4 * len(names)) + "|",
    ]
    for task, cell in summary["cells"].items():
        parts = [
            f"{fmt(c['time_to_kept_s'])} | {fmt(c['total_s'])} | {c['peak_mib'] or 0:.0f} | "
            f"{c['kept_epochs']}"
            if (c := cell.get(n))
            else "— | — | — | —"
            for n in names
        ]
        ratios = [f"{n} {fmt(c['ratio'], 2)}" for n in names if "ratio" in (c := cell.get(n, {}))]
        lines.append(f"| {task} | " + " | ".join(parts) + f" | {'; '.join(ratios) or '—'} |")
    lines += [
        "",
        "Suite (sum over tasks and seeds, per round): "
        + "; ".join(f"{n} {fmt(s)} s" for n, s in summary["suite_s"].items()),
    ]
    for name, ratio in summary["suite_ratio"].items():
        verdict = "met" if ratio["median"] <= KEPT_GOAL else "NOT met"
        lines.append(f"- {name} / {ref}: {fmt(ratio, 3)} (goal <= {KEPT_GOAL}: {verdict})")
    errors = [r for r in report["runs"] if "error" in r]
    lines += [f"- failed: {r['task']}/{r['seed']}/{r['contender']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--mode", choices=("epoch", "to-kept"), default="epoch")
    parser.add_argument("--smoke", action="store_true", help="both modes on tiny data: seconds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--backbones", nargs="+", choices=list(BACKBONE_NAMES), default=None)
    parser.add_argument("--datasets", nargs="+", default=None, help="epoch mode")
    parser.add_argument("--tasks", nargs="+", default=list(SUITE), help="to-kept mode")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="to-kept mode")
    parser.add_argument("--contenders", nargs="+", choices=[*CONTENDERS, FAST], default=None)
    parser.add_argument("--reference", default="pfeiffer", help="to-kept mode: the ratios' denominator")
    parser.add_argument("--rounds", type=int, default=None, help="default 5 (epoch), 3 (to-kept)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="epoch mode: skip the peak-memory processes")
    parser.add_argument("--epoch-memory", help=argparse.SUPPRESS)
    parser.add_argument("--kept-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for worker, run in (("epoch_memory", epoch_memory), ("kept_worker", kept_run)):
        if getattr(args, worker):
            print(json.dumps(run(json.loads(getattr(args, worker)))))
            return
    cache_dir, started = Settings().cache_dir, datetime.now().astimezone()
    args.backbones = args.backbones or ["minilm"]
    environment = harness.environment(torch_threads=args.threads, omp=os.environ.get("OMP_WAIT_POLICY"))
    command = harness.command_line("bench_training_speed.py")
    base = dict(date=started.isoformat(timespec="seconds"), load_before=os.getloadavg()[0], command=command,
                environment=environment)  # fmt: skip
    suffix = "_smoke" if args.smoke else ""
    if args.mode == "epoch" or args.smoke:
        report = {**base, **epoch_mode(args, cache_dir), "load_after": os.getloadavg()[0]}
        harness.write_report(args.out, f"speed_training{suffix}", report, render_epoch(report))
        plot_epoch(report, args.out / f"speed_training{suffix}.png")
    if args.mode == "to-kept" or args.smoke:
        if args.smoke:
            args.tasks, args.contenders, args.rounds = ["trec"], [FAST, "pfeiffer"], 2
        args.rounds = args.rounds or 3
        runs = time_to_kept(args, cache_dir)
        summary = kept_summary(runs, args.reference)
        report = dict(base, load_after=os.getloadavg()[0], rounds=args.rounds, seeds=args.seeds,
                      reference=args.reference, runs=runs, summary=summary)  # fmt: skip
        harness.write_report(args.out, f"speed_training_kept{suffix}", report, render_kept(report))
        for name, ratio in summary["suite_ratio"].items():
            print(f"{name} / {args.reference}, to the kept epoch: {harness.fmt_spread(ratio, 3)}", flush=True)


def epoch_mode(args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    workload = SMOKE_WORKLOAD if args.smoke else FULL_WORKLOAD
    names = [n for n in args.contenders or (SMOKE_CONTENDERS if args.smoke else CONTENDERS) if n != FAST]
    rounds = 2 if args.smoke else args.rounds or 5
    datasets = args.datasets or list(DATASETS[:1] if args.smoke else DATASETS)
    rows = []
    for backbone in args.backbones:
        mine = [n for n in names if n != "full" or backbone == "minilm"]  # full fine-tuning: MiniLM only
        for dataset in datasets:
            rows += time_group(backbone, dataset, mine, workload, rounds, cache_dir)
    method = "not measured (--no-memory)"
    if not args.no_memory:
        measure_epoch_memory(rows, workload, args.threads, cache_dir)
        method = "fresh process per contender, HWM reset via /proc/self/clear_refs"
    ratio_rows = epoch_ratios(rows)
    goal = [{**r, "adapter": r["reference"], "ratio": r["median"], "goal": GOAL, "met": r["median"] <= GOAL}
            for r in ratio_rows if r["contender"] == "spartan" and r["reference"] in ADAPTERS]  # fmt: skip
    shape = {**workload.__dict__, "steps_per_epoch": workload.steps_per_epoch, "datasets": datasets}
    return dict(rounds=rounds, memory_method=method, workload=shape, runs=rows, ratios=ratio_rows, goal=goal)


if __name__ == "__main__":
    main()
