"""SPARTAN's own hyperparameters, one at a time around the shipped defaults, scored on dev splits only.

    .venv-peers/bin/python benchmarks/bench_spartan_tuning.py            # docs/results/spartan_tuning.*
    .venv-peers/bin/python benchmarks/bench_spartan_tuning.py --smoke --out /tmp/x

Each variant changes one of E (parents), C (children per parent), k (parents chosen per token),
T (child softmax temperature), the task's own LayerNorm copies (on/off) and the learning rate, trains
with the accuracy benchmark's few-shot budget and loop, and records the dev accuracy (test is never
looked at here). Resumable like the accuracy benchmark: one JSONL line per finished run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.settings import Settings
from benchmarks.bench_accuracy import CENTRE_LR, RESULTS, append_record, read_records, run_one
from benchmarks.peers import SpartanConfig

DEFAULT = SpartanConfig()
VARIANTS: dict[str, tuple[SpartanConfig, float]] = {  # name -> (memory shape, learning rate)
    "default": (DEFAULT, CENTRE_LR["spartan"]),
    "E=8": (replace(DEFAULT, num_parents=8), CENTRE_LR["spartan"]),
    "E=64": (replace(DEFAULT, num_parents=64), CENTRE_LR["spartan"]),
    "C=1": (replace(DEFAULT, num_children=1), CENTRE_LR["spartan"]),
    "C=8": (replace(DEFAULT, num_children=8), CENTRE_LR["spartan"]),
    "k=2": (replace(DEFAULT, top_k=2), CENTRE_LR["spartan"]),
    "k=4": (replace(DEFAULT, top_k=4), CENTRE_LR["spartan"]),
    "T=0.8": (replace(DEFAULT, temperature=0.8), CENTRE_LR["spartan"]),
    "T=3.2": (replace(DEFAULT, temperature=3.2), CENTRE_LR["spartan"]),
    "no LayerNorm": (replace(DEFAULT, train_layernorm=False), CENTRE_LR["spartan"]),
    "lr/3": (DEFAULT, CENTRE_LR["spartan"] / 3),
    "lr*3": (DEFAULT, CENTRE_LR["spartan"] * 3),
}


Variants = dict[str, tuple[SpartanConfig, float]]


def tune(
    variants: Variants, tasks: list[str], seeds: list[int], setting: str, path: Path, shard: tuple[int, int]
) -> None:
    cache_dir = Settings().cache_dir
    done = {(r["variant"], r["task"], r["seed"]) for r in read_records(path)}
    jobs = [(v, t, s) for s in seeds for t in tasks for v in variants if (v, t, s) not in done]
    for number, (variant, task, seed) in enumerate(jobs):
        if number % shard[1] != shard[0]:
            continue
        config, lr = variants[variant]
        record = run_one("minilm", task, "spartan", setting, seed, lr, cache_dir, spartan=config)
        record.update(variant=variant, spartan=asdict(config))
        record.pop("test", None)  # tuning must not look at test scores
        append_record(path, record)
        print(f"{variant} {task} seed {seed}: dev {record['dev']}", flush=True)


def report(variants: Variants, path: Path, out: Path) -> None:
    dev: dict[str, list[float]] = defaultdict(list)
    for record in read_records(path):
        dev[record["variant"]].append(record["dev"]["accuracy"] * 100)
    base = statistics.mean(dev["default"]) if dev.get("default") else 0.0
    lines = [
        "# SPARTAN hyperparameters (dev accuracy %, few-shot)",
        "",
        "| variant | dev accuracy % (mean over task x seed) | vs default |",
        "|---|---|---|",
    ]
    for variant in variants:
        if dev.get(variant):
            value = statistics.mean(dev[variant])
            lines.append(f"| {variant} | {value:.1f} ({len(dev[variant])} runs) | {value - base:+.1f} |")
    (out / "spartan_tuning.md").write_text("\n".join(lines) + "\n")
    (out / "spartan_tuning.json").write_text(json.dumps(dev, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", nargs="+", default=["banking77", "trec"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--shard", default="0/1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    index, _, count = args.shard.partition("/")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "spartan_tuning.jsonl"
    variants = VARIANTS
    if args.smoke:
        variants = {name: VARIANTS[name] for name in ("default", "k=2", "no LayerNorm")}
        args.tasks = ["trec"]
    setting = "smoke" if args.smoke else "few"
    tune(variants, args.tasks, args.seeds, setting, path, (int(index), int(count)))
    report(variants, path, args.out)


if __name__ == "__main__":
    main()
