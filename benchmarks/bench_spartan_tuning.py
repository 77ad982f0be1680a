"""SPARTAN's own hyperparameters, one at a time around the shipped defaults, scored on dev splits only.

    .venv-peers/bin/python benchmarks/bench_spartan_tuning.py            # docs/results/spartan_tuning.*
    .venv-peers/bin/python benchmarks/bench_spartan_tuning.py --smoke --out /tmp/x

Each variant changes one of E (parents), C (children), k (parents per token), T (child temperature), the
LayerNorm copies or the lr, with bench_accuracy's few-shot budget and loop. Resumable: a JSONL line a run.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.settings import Settings
from benchmarks import harness
from benchmarks.bench_accuracy import CENTRE_LR, parse_shard, run_one
from benchmarks.peers import SpartanConfig

DEFAULT, LR = SpartanConfig(), CENTRE_LR["spartan"]
VARIANTS: dict[str, tuple[SpartanConfig, float]] = {  # name -> (memory shape, learning rate)
    "default": (DEFAULT, LR),
    **{f"E={v}": (replace(DEFAULT, num_parents=v), LR) for v in (8, 64)},
    **{f"C={v}": (replace(DEFAULT, num_children=v), LR) for v in (1, 8)},
    **{f"k={v}": (replace(DEFAULT, top_k=v), LR) for v in (2, 4)},
    **{f"T={v}": (replace(DEFAULT, temperature=v), LR) for v in (0.8, 3.2)},
    "no LayerNorm": (replace(DEFAULT, train_layernorm=False), LR),
    "lr/3": (DEFAULT, LR / 3),
    "lr*3": (DEFAULT, LR * 3),
}
SMOKE_VARIANTS = ("default", "k=2", "no LayerNorm")


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS)
    cli.add_argument("--tasks", nargs="+", default=["banking77", "trec"])
    cli.add_argument("--seeds", nargs="+", type=int, default=[0])
    cli.add_argument("--shard", type=parse_shard, default="0/1", help="I/N: every N-th run from the I-th")
    args = cli.parse_args()
    torch.set_num_threads(args.threads)
    variants = {name: VARIANTS[name] for name in SMOKE_VARIANTS} if args.smoke else VARIANTS
    tasks, setting = (["trec"], "smoke") if args.smoke else (args.tasks, "few")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "spartan_tuning.jsonl"
    done = {(r["variant"], r["task"], r["seed"]) for r in harness.read_records(path)}
    jobs = [(v, t, s) for s in args.seeds for t in tasks for v in variants if (v, t, s) not in done]
    for variant, task, seed in jobs[args.shard[0] :: args.shard[1]]:
        config, lr = variants[variant]
        record = run_one(("minilm", task, "spartan", setting, seed, lr), Settings().cache_dir, spartan=config)
        record.update(variant=variant, spartan=asdict(config))
        record.pop("test", None)  # tuning must not look at test scores
        harness.append_record(path, record)
        print(f"{variant} {task} seed {seed}: dev {record['dev']}", flush=True)
    dev: dict[str, list[float]] = defaultdict(list)
    for record in harness.read_records(path):
        dev[record["variant"]].append(record["dev"]["accuracy"] * 100)
    base = statistics.mean(dev["default"]) if dev.get("default") else 0.0
    means = {name: statistics.mean(dev[name]) for name in variants if dev.get(name)}
    rows = [(name, f"{m:.1f} ({len(dev[name])} runs)", f"{m - base:+.1f}") for name, m in means.items()]
    head = ("variant", "dev accuracy % (mean over task x seed)", "vs default")
    lines = ["# SPARTAN hyperparameters (dev accuracy %, few-shot)", "", *harness.table(head, rows)]
    (args.out / "spartan_tuning.md").write_text("\n".join(lines) + "\n")
    (args.out / "spartan_tuning.json").write_text(json.dumps(dev, indent=1))


if __name__ == "__main__":
    main()
