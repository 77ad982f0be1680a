"""Few-shot training speed of SPARTAN against its peers: one epoch on the very same batches (--mode epoch,
docs/results/speed_training.*), and wall time from the start to the kept epoch (--mode to-kept,
docs/results/speed_training_kept.*). Method: docs/BENCHMARKS.md, "Training speed".

    .venv-peers/bin/python benchmarks/bench_training_speed.py                  # per-epoch
    .venv-peers/bin/python benchmarks/bench_training_speed.py --mode to-kept   # 9 tasks, seed 0, 3 rounds
    .venv-peers/bin/python benchmarks/bench_training_speed.py --smoke          # both modes, tiny (tests)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import operator
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.fit as fit_module
from app.settings import Settings
from app.training.datasets import TaskData
from benchmarks import bench_accuracy, harness
from benchmarks.bench_accuracy import BUDGETS, CENTRE_LR, FAST, PILOT, SUITE, task_data
from benchmarks.fit import FitConfig, FitResult, encode, loss_of, targets
from benchmarks.peers import BACKBONE_NAMES, Built, MethodUnavailable, build

CONTENDERS = ("spartan", "pfeiffer", "houlsby", "lora", "head", "full")
SMOKE_CONTENDERS = ("spartan", "pfeiffer")
ADAPTERS = ("pfeiffer", "houlsby")
DATASETS = ("banking77", "20ng")
GOAL = 0.75  # per epoch: SPARTAN <= 0.75 x adapters (the paper's "34% faster")
KEPT_GOAL = 0.5  # issue 14: time to the kept epoch <= 0.5 x Pfeiffer's
WARMUP_STEPS = 2
PHASES = ("forward", "backward", "optimizer")
ROW_KEY = operator.itemgetter("backbone", "dataset", "contender")
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
    built: Built
    data: TaskData
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR


def make_contender(
    name: str, backbone: str, data: TaskData, workload: Workload, cache_dir: Path
) -> Contender:
    """The built method with benchmarks/fit.py's optimiser and schedule over the few-shot budget."""
    built = build(name, backbone, cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=workload.seed)
    built.model.train()
    optimizer = torch.optim.AdamW(built.model.trainable(), lr=CENTRE_LR[name], weight_decay=0.01)
    total = workload.steps_per_epoch * BUDGETS["few"].epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total))
    return Contender(built, data, optimizer, schedule)


def make_batches(built: Built, data: TaskData, workload: Workload) -> list[Batch]:
    """The first epoch's batches of benchmarks/fit.py (same permutation), tokenised once."""
    order = np.random.default_rng(workload.seed).permutation(len(data.train))[: workload.examples]
    chunks = [
        [data.train[i] for i in order[s : s + workload.batch_size]]
        for s in range(0, len(order), workload.batch_size)
    ]
    return [Batch(encode(built, c, data.has_pairs, workload.max_length), targets(data, c)) for c in chunks]


def train_epoch(contender: Contender, batches: list[Batch]) -> dict[str, Any]:
    """One epoch as benchmarks/fit.py trains it; per step, (forward, backward, optimiser) milliseconds."""
    phases = []
    for batch in batches:
        began = time.perf_counter()
        loss = loss_of(contender.data, contender.built.model(batch.encoding), batch.target)
        forward_done = time.perf_counter()
        contender.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        backward_done = time.perf_counter()
        contender.optimizer.step()
        contender.schedule.step()
        ended = time.perf_counter()
        phases.append([forward_done - began, backward_done - forward_done, ended - backward_done])
    steps = [1000 * sum(p) for p in phases]
    split = {f"{name}_ms": [1000 * p[i] for p in phases] for i, name in enumerate(PHASES)}
    return {"step_ms": steps, **split, "epoch_s": sum(steps) / 1000}


def time_group(
    backbone: str, dataset: str, names: list[str], workload: Workload, rounds: int, cache_dir: Path
) -> list[dict[str, Any]]:
    """Build every contender of one (backbone, dataset) and time them in rotated rounds."""
    data = task_data(dataset, workload.setting, workload.seed, cache_dir)
    contenders, rows = {}, {}
    for name in names:
        try:
            contenders[name] = make_contender(name, backbone, data, workload, cache_dir)
        except MethodUnavailable as err:
            rows[name] = {"available": False, "reason": str(err).splitlines()[0]}
    if contenders:
        first = next(iter(contenders.values())).built
        batches = make_batches(first, data, workload)
        began = time.perf_counter()
        make_batches(first, data, workload)
        tokenize_s = time.perf_counter() - began
        for contender in contenders.values():
            train_epoch(contender, batches[:WARMUP_STEPS])
        label = f"{backbone}/{dataset}"
        per_round = harness.rotated_rounds(
            list(contenders),
            rounds,
            lambda n: train_epoch(contenders[n], batches),
            lambda n: print(f"{label} round {n + 1}/{rounds}, load {os.getloadavg()[0]:.2f}", flush=True),
        )
    for name, contender in contenders.items():
        done, model = per_round[name], contender.built.model
        rows[name] = {
            "available": True, "lr": CENTRE_LR[name], "task_bytes": model.task_bytes(),
            "trainable_parameters": sum(p.numel() for p in model.trainable()),
            "step_ms": harness.spread([ms for r in done for ms in r["step_ms"]]),
            "phase_ms": {p: statistics.median(ms for r in done for ms in r[f"{p}_ms"]) for p in PHASES},
            "epoch_s": harness.spread([r["epoch_s"] for r in done]), "tokenize_epoch_s": tokenize_s,
            "batches": [b.shape() for b in batches], "rounds": done,
        }  # fmt: skip
    return [{"backbone": backbone, "dataset": dataset, "contender": n, **rows[n]} for n in names]


def saved_activation_bytes(contender: Contender, batch: Batch) -> int:
    """Bytes of the distinct storages autograd keeps for backward on one forward (parameters excluded)."""
    model = contender.built.model
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):  # tensors without a plain storage
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_of(contender.data, model(batch.encoding), batch.target)
    return sum(seen.values())


def epoch_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak memory of one contender's training epoch, measured in this (fresh) process."""
    workload, cache_dir = Workload(**job["workload"]), Path(job["cache_dir"])
    data = task_data(job["dataset"], workload.setting, workload.seed, cache_dir)
    contender = make_contender(job["contender"], job["backbone"], data, workload, cache_dir)
    model, batches = contender.built.model, make_batches(contender.built, data, workload)
    # One forward + backward first (no optimiser step, so AdamW's state stays unallocated): one-time
    # process costs (autograd's worker, kernel caches) are not this method's training.
    loss_of(data, model(batches[0].encoding), batches[0].target).backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    rss = harness.status_mib("VmRSS")
    resettable = harness.reset_peak()
    train_epoch(contender, batches)
    state = [t for s in contender.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    longest = max(batches, key=lambda b: b.shape()["rows"] * b.shape()["padded_length"])
    return {
        "rss_after_build_mib": rss,
        "peak_mib": max(0.0, harness.status_mib("VmHWM") - rss) if resettable else None,
        "hwm_reset": resettable,
        "optimizer_state_mib": sum(t.numel() * t.element_size() for t in state) / 2**20,
        "gradient_mib": sum(g.numel() * g.element_size() for g in grads) / 2**20,
        "saved_activations_mib": saved_activation_bytes(contender, longest) / 2**20,
    }


def child(worker: str, job: dict[str, Any], threads: int, env: dict[str, str] | None = None) -> Any:
    """One measurement in a fresh process of this script (its last stdout line is the JSON result)."""
    command = [sys.executable, __file__, "--threads", str(threads), f"--{worker}", json.dumps(job)]
    try:
        return harness.run_child(command, timeout_s=3600, env=env)
    except (RuntimeError, ValueError) as err:
        return {"error": str(err).strip().splitlines()[-1]}


def epoch_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per round: spartan's epoch time / every other's, and every other's / pfeiffer's (same batches)."""
    result = []
    for group in dict.fromkeys((r["backbone"], r["dataset"]) for r in rows):
        mine = [r for r in rows if (r["backbone"], r["dataset"]) == group and r["available"]]
        epochs = {r["contender"]: [x["epoch_s"] for x in r["rounds"]] for r in mine}
        pairs = [("spartan", ref) for ref in epochs if ref != "spartan"]
        pairs += [(name, "pfeiffer") for name in epochs if name not in ("spartan", "pfeiffer")]
        for name, ref in [(n, r) for n, r in pairs if n in epochs and r in epochs]:
            per_round = [a / b for a, b in zip(epochs[name], epochs[ref], strict=True)]
            keys = {"backbone": group[0], "dataset": group[1], "contender": name, "reference": ref}
            result.append({**keys, "per_round": per_round, **harness.spread(per_round)})
    return result


def epoch_mode(args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    workload = SMOKE_WORKLOAD if args.smoke else FULL_WORKLOAD
    contenders = args.contenders or (SMOKE_CONTENDERS if args.smoke else CONTENDERS)
    rounds = 2 if args.smoke else args.rounds or 5
    datasets = args.datasets or list(DATASETS[:1] if args.smoke else DATASETS)
    rows = []
    for backbone in args.backbones:
        # full fine-tuning: MiniLM only
        names = [n for n in contenders if not n.startswith(FAST) and (n != "full" or backbone == "minilm")]
        for dataset in datasets:
            rows += time_group(backbone, dataset, names, workload, rounds, cache_dir)
            gc.collect()  # the group's models
    method = "not measured (--no-memory)"
    if not args.no_memory:
        method = "fresh process per contender, HWM reset via /proc/self/clear_refs"
        # The smoke run starts one such process (the first contender's), not one per contender.
        for row in [r for r in rows if r["available"]][: 1 if args.smoke else None]:
            job = {key: row[key] for key in ("backbone", "dataset", "contender")}
            more = {"workload": asdict(workload), "cache_dir": str(cache_dir)}
            row["memory"] = child("epoch-memory", {**job, **more}, args.threads, harness.MMAP_ENV)
            print(f"memory {job}: {row['memory']}", flush=True)
    ratios = epoch_ratios(rows)
    goal = [{**r, "adapter": r["reference"], "ratio": r["median"], "goal": GOAL, "met": r["median"] <= GOAL}
            for r in ratios if r["contender"] == "spartan" and r["reference"] in ADAPTERS]  # fmt: skip
    shape = {**asdict(workload), "steps_per_epoch": workload.steps_per_epoch, "datasets": datasets}
    return dict(rounds=rounds, memory_method=method, workload=shape, runs=rows, ratios=ratios, goal=goal)


def epoch_row(row: dict[str, Any], vs_pfeiffer: dict[str, float] | None) -> tuple[Any, ...]:
    """One contender's cells of the epoch table."""
    fmt = harness.fmt_spread
    if not row["available"]:
        return (*ROW_KEY(row), f"unavailable: {row['reason'][:60]}", *["—"] * 7)
    memory = row.get("memory") or {}
    mibs = [
        "n/a" if memory.get(k) is None else f"{memory[k]:.0f}" for k in ("peak_mib", "saved_activations_mib")
    ]
    phases = " / ".join(f"{row['phase_ms'][p]:.0f}" for p in PHASES)
    counts = f"{row['trainable_parameters']:,}", f"{row['task_bytes']:,}"
    vs = fmt(vs_pfeiffer, 2) if vs_pfeiffer else "1" if row["contender"] == "pfeiffer" else "—"
    return (*ROW_KEY(row), fmt(row["step_ms"], 0), phases, fmt(row["epoch_s"], 2), *mibs, *counts, vs)


def render_epoch(report: dict[str, Any]) -> str:
    work, fmt = report["workload"], harness.fmt_spread
    vs = {ROW_KEY(r): r for r in report["ratios"] if r["reference"] == "pfeiffer"}
    head = ("backbone", "dataset", "contender", "step ms", "fwd / bwd / opt ms", "s/epoch", "peak MiB",
            "saved act. MiB", "params", "bytes/task", "vs pfeiffer")  # fmt: skip
    rows = [epoch_row(r, vs.get(ROW_KEY(r))) for r in report["runs"]]
    goals = [f"- {g['backbone']}/{g['dataset']} vs {g['adapter']}: {fmt(g, 2)}: "
             f"{'met' if g['met'] else 'NOT met'}" for g in report["goal"]]  # fmt: skip
    return "\n".join([
        f"# Training speed: SPARTAN vs adapters vs LoRA ({report['date'][:10]})", "",
        f"{harness.header(report)} Torch threads {report['environment']['torch_threads']}.", "",
        f"{work['examples']} examples, batch {work['batch_size']} ({work['steps_per_epoch']} steps per "
        f"epoch), length {work['max_length']}, the same batches for every contender, {report['rounds']} "
        "rounds (one epoch each, contenders rotated). step ms: median [min, max] over every step; fwd / bwd "
        "/ opt: medians of each phase; s/epoch: median [min, max] over rounds; peak MiB: one epoch on top of "
        f"the built model ({report['memory_method']}); saved act.: tensors kept for backward on the longest "
        "batch; vs pfeiffer: per-round epoch-time ratio.", "",
        *harness.table(head, rows), "",
        f"## Goal: SPARTAN epoch time <= {GOAL} x adapters", "",
        *(goals or ["- no adapter ran"]), "",
        "Why: every method with trainable parts inside the layers back-propagates through the whole "
        "frozen backbone; their modules cost 1-2.5% of a layer (docs/RESULTS.md section 3). The "
        "few-shot recipe (--mode to-kept) avoids it: memories in the top layers only.",
    ]) + "\n"  # fmt: skip


def plot_epoch(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    backbones = list(dict.fromkeys(r["backbone"] for r in report["runs"]))
    fig, axes = plt.subplots(1, len(backbones), figsize=(7 * len(backbones), 5), squeeze=False)
    for axis, backbone in zip(axes[0], backbones, strict=True):
        runs = [r for r in report["runs"] if r["backbone"] == backbone and r["available"]]
        datasets = list(dict.fromkeys(r["dataset"] for r in runs))
        names = list(dict.fromkeys(r["contender"] for r in runs))
        width = 0.8 / max(1, len(names))
        for row in runs:
            i, j, name = datasets.index(row["dataset"]), names.index(row["contender"]), row["contender"]
            per_step = [1000 * r["epoch_s"] / len(r["step_ms"]) for r in row["rounds"]]
            mid = statistics.median(per_step)
            errors = [[mid - min(per_step)], [max(per_step) - mid]]
            x, color = i + (j - (len(names) - 1) / 2) * width, COLORS.get(name, "#777")
            axis.bar(x, mid, width, color=color, label=name if i == 0 else None, yerr=errors)
        axis.set_xticks(range(len(datasets)), datasets)
        axis.set_ylabel("ms per training step (epoch mean)")
        axis.set_title(f"{backbone}: median over {report['rounds']} rounds, whiskers min..max")
        axis.legend(fontsize=8)
    harness.save_figure(fig, path, dpi=110)


# --- from the start to the kept epoch ---------------------------------------------------------------------


def fit_timed(built: Built, data: TaskData, config: FitConfig) -> tuple[FitResult, list[float]]:
    """benchmarks.fit.fit, and when (seconds from its start) it finished each scoring: its dev scorings
    in order, then the test's. fit's module-level `score` is wrapped for the call; fit is unchanged."""
    score, stamps, began = fit_module.score, [], time.perf_counter()

    def timed(*args: Any, **kwargs: Any) -> dict[str, float]:
        result = score(*args, **kwargs)
        stamps.append(time.perf_counter() - began)
        return result

    with mock.patch.object(fit_module, "score", timed):
        return fit_module.fit(built, data, config), stamps


def kept_run(job: dict[str, Any]) -> dict[str, Any]:
    """One training run, in this (fresh) process: time to the kept epoch, total, peak memory, scores."""
    cache_dir, setting, seed, name = Path(job["cache_dir"]), job["setting"], job["seed"], job["contender"]
    budget = BUDGETS[setting]
    data = task_data(job["task"], setting, seed, cache_dir)  # read before the baseline (cached)
    if name.startswith(FAST):
        bench_accuracy.spartan_encoder(job["backbone"], cache_dir)  # the build, before the baseline (cached)
    else:
        built = build(
            name, job["backbone"], cache_dir, num_outputs=len(data.labels) or 1, data=data, seed=seed
        )
        config = FitConfig(
            job["lr"], budget.epochs, max_length=budget.max_length, eval_every=budget.eval_every, seed=seed
        )
    # Reset first, then read: the high-water mark restarts at the RSS of the reset, so it can never be
    # below an RSS read after it (read before, a page freed in between made the peak negative).
    resettable = harness.reset_peak()
    rss = harness.status_mib("VmRSS")
    if name.startswith(FAST):  # spartan-fast[NAME]: bench_accuracy's pilot variant NAME of the recipe
        changes = PILOT[name[len(FAST) + 1 : -1]] if name != FAST else {}
        record = bench_accuracy.run_recipe(job["backbone"], job["task"], setting, seed, cache_dir, changes)
        kept_s, total_s, kept = record["seconds_to_best"], record["train_seconds"], record["best_epoch"]
        evaluated, dev, test = sorted(int(e) for e in record["dev_by_epoch"]), record["dev"], record["test"]
    else:
        result, stamps = fit_timed(built, data, config)
        every, epochs = budget.eval_every, budget.epochs
        evaluated = [e for e in range(1, epochs + 1) if e % every == 0 or e == epochs]
        kept, dev, test = result.best_epoch, result.dev, result.test
        kept_s, total_s = stamps[evaluated.index(kept)], stamps[len(evaluated) - 1]
    return {
        "time_to_kept_s": kept_s, "total_s": total_s, "kept_epoch": kept, "dev_epochs": evaluated, "dev": dev,
        "test": test, "peak_mib": harness.status_mib("VmHWM") - rss if resettable else None,
    }  # fmt: skip


def kept_mode(args: argparse.Namespace, cache_dir: Path) -> dict[str, Any]:
    """Every (task, seed) x contender, once per round, each run in a fresh process, order rotated (the
    smoke run: in this process, one process start instead of one per run)."""
    if args.smoke:
        args.tasks, args.contenders, args.rounds = ["trec"], [FAST, "pfeiffer"], 2
    names, rounds, runs = args.contenders or [FAST, "pfeiffer"], args.rounds or 3, []
    setting = "smoke" if args.smoke else "few"
    for number in range(rounds):
        order = names[number % len(names) :] + names[: number % len(names)]
        for task, seed, name in itertools.product(args.tasks, args.seeds, order):
            job = {"backbone": args.backbones[0], "task": task, "seed": seed, "contender": name,
                   "setting": setting, "lr": CENTRE_LR.get(name),  # spartan-fast: its recipe's
                   "cache_dir": str(cache_dir)}  # fmt: skip
            # glibc's own allocator settings (no MMAP_ENV), as a service runs: docs/BENCHMARKS.md.
            result = kept_run(job) if args.smoke else child("kept-worker", job, args.threads)
            runs.append({**job, "round": number, **result})
            print(f"round {number + 1}: {task}/{seed}/{name}: {runs[-1]}", flush=True)
    summary = kept_summary(runs, args.reference)
    for name, ratio in summary["suite_ratio"].items():
        print(f"{name} / {args.reference}, to the kept epoch: {harness.fmt_spread(ratio, 3)}", flush=True)
    return dict(rounds=rounds, seeds=args.seeds, reference=args.reference, runs=runs, summary=summary)


def kept_summary(runs: list[dict[str, Any]], reference: str) -> dict[str, Any]:
    """Per task and contender: medians over rounds; per round, each contender's suite time and its
    ratio to the reference's (same round, so the same machine state)."""
    ok = [r for r in runs if "error" not in r]
    names = list(dict.fromkeys(r["contender"] for r in ok))
    kept = {(r["task"], r["contender"], r["round"], r["seed"]): r["time_to_kept_s"] for r in ok}
    cells: dict[str, dict[str, Any]] = {}
    for task, name in itertools.product(dict.fromkeys(r["task"] for r in ok), names):
        mine = [r for r in ok if (r["task"], r["contender"]) == (task, name)]
        if not mine:
            continue
        peaks = [r["peak_mib"] for r in mine if r["peak_mib"] is not None]
        cells.setdefault(task, {})[name] = cell = {
            "time_to_kept_s": harness.spread([r["time_to_kept_s"] for r in mine]),
            "total_s": harness.spread([r["total_s"] for r in mine]), "peak_mib": max(peaks, default=None),
            "kept_epochs": sorted({r["kept_epoch"] for r in mine}),
            "test_accuracy": statistics.mean(100 * r["test"].get("accuracy", 0.0) for r in mine),
        }  # fmt: skip
        theirs = [(r["time_to_kept_s"], kept.get((task, reference, r["round"], r["seed"]))) for r in mine]
        per_round = [a / b for a, b in theirs if b is not None]
        if per_round and name != reference:
            cell["ratio"] = harness.spread(per_round)
    suite = {
        name: [sum(r["time_to_kept_s"] for r in ok if (r["round"], r["contender"]) == (number, name))
               for number in sorted({r["round"] for r in ok})]
        for name in names
    }  # fmt: skip
    ratios = harness.ratios(suite, reference) if reference in suite else {}
    suite_s = {n: harness.spread(v) for n, v in suite.items() if v}
    return {"cells": cells, "suite_s": suite_s, "suite_ratio": ratios}


def render_kept(report: dict[str, Any]) -> str:
    summary, ref, fmt = report["summary"], report["reference"], harness.fmt_spread
    names = list(summary["suite_s"])
    columns = ("s to kept", "total s", "peak MiB", "kept")
    head = ["task", *(f"{n} {c}" for n in names for c in columns), f"to kept vs {ref}"]
    rows = []
    for task, cell in summary["cells"].items():
        parts = [
            (fmt(c["time_to_kept_s"]), fmt(c["total_s"]), f"{c['peak_mib'] or 0:.0f}", c["kept_epochs"])
            if (c := cell.get(n)) else ("—",) * 4
            for n in names
        ]  # fmt: skip
        ratios = [f"{n} {fmt(c['ratio'], 2)}" for n in names if "ratio" in (c := cell.get(n, {}))]
        rows.append((task, *(p for part in parts for p in part), "; ".join(ratios) or "—"))
    lines = [
        f"# Few-shot training: wall time from the start to the kept epoch ({report['date'][:10]})", "",
        f"{harness.header(report)} Torch threads {report['environment']['torch_threads']}. Seeds "
        f"{report['seeds']}, {report['rounds']} rounds, one fresh process per run. Seconds: median "
        "[min, max] over rounds, from the start of training (the build excluded) to the end of the kept "
        "epoch's dev scoring; total: to the end of the last dev scoring. Peak MiB: VmHWM during training - "
        "RSS after the build (max over rounds).", "",
        *harness.table(head, rows), "",
        "Suite (sum over tasks and seeds, per round): "
        + "; ".join(f"{n} {fmt(s)} s" for n, s in summary["suite_s"].items()),
    ]  # fmt: skip
    for name, ratio in summary["suite_ratio"].items():
        verdict = "met" if ratio["median"] <= KEPT_GOAL else "NOT met"
        lines.append(f"- {name} / {ref}: {fmt(ratio, 3)} (goal <= {KEPT_GOAL}: {verdict})")
    failed = [r for r in report["runs"] if "error" in r]
    lines += [f"- failed: {r['task']}/{r['seed']}/{r['contender']}: {r['error']}" for r in failed]
    return "\n".join(lines) + "\n"


def contender_name(name: str) -> str:
    """A peer, the recipe, or the recipe's pilot variant as `spartan-fast[NAME]`."""
    if name in (*CONTENDERS, FAST) or (name.startswith(f"{FAST}[") and name[len(FAST) + 1 : -1] in PILOT):
        return name
    raise argparse.ArgumentTypeError(f"{name!r}: one of {', '.join((*CONTENDERS, FAST))} or {FAST}[variant]")


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS)
    cli.add_argument("--mode", choices=("epoch", "to-kept"), default="epoch")
    cli.add_argument("--backbones", nargs="+", choices=list(BACKBONE_NAMES), default=["minilm"])
    cli.add_argument("--datasets", nargs="+", default=None, help="epoch mode")
    cli.add_argument("--tasks", nargs="+", default=list(SUITE), help="to-kept mode")
    cli.add_argument("--seeds", nargs="+", type=int, default=[0], help="to-kept mode")
    cli.add_argument("--contenders", nargs="+", type=contender_name, default=None)
    cli.add_argument("--reference", default="pfeiffer", help="to-kept mode: the ratios' denominator")
    cli.add_argument("--rounds", type=int, default=None, help="default 5 (epoch), 3 (to-kept)")
    cli.add_argument("--no-memory", action="store_true", help="epoch mode: skip the peak-memory processes")
    cli.add_argument("--epoch-memory", help=argparse.SUPPRESS)
    cli.add_argument("--kept-worker", help=argparse.SUPPRESS)
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    for worker, run in (("epoch_memory", epoch_memory), ("kept_worker", kept_run)):
        if getattr(args, worker):
            print(json.dumps(run(json.loads(getattr(args, worker)))))
            return
    cache_dir, started = Settings().cache_dir, datetime.now().astimezone().isoformat(timespec="seconds")

    def new_report() -> dict[str, Any]:
        command = harness.command_line("bench_training_speed.py")
        return {
            "date": started,
            "command": command,
            "environment": harness.environment(torch_threads=args.threads),
        }

    if args.mode == "epoch" or args.smoke:
        report = {**new_report(), **epoch_mode(args, cache_dir)}
        harness.finish(args.out, "speed_training", report, render_epoch, plot_epoch, smoke=args.smoke)
    if args.mode == "to-kept" or args.smoke:
        report = {**new_report(), **kept_mode(args, cache_dir)}
        harness.finish(args.out, "speed_training_kept", report, render_kept, smoke=args.smoke)


if __name__ == "__main__":
    main()
