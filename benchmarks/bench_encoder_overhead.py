"""Forward throughput of the backbone with SPARTAN memories vs the bare backbone.

The bare backbone is a separately loaded, untouched transformers model (no hooks, no wrapped
LayerNorms), so every cost SPARTAN adds is counted. Runs alternate bare / SPARTAN / SPARTAN+LN
round by round, so machine noise hits all contenders alike; we report the median of the rounds and
the spread of the per-round ratios.

    python benchmarks/bench_encoder_overhead.py            # MiniLM, batch 1 and 32, length 128
    python benchmarks/bench_encoder_overhead.py --smoke    # seconds; run by the tests
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine.backbone import load_backbone
from app.engine.encoder import RowGroup, SpartanEncoder
from app.settings import Settings
from app.spartan.memory import MemorySpec, TaskMemory

WORDS = [
    "the",
    "movie",
    "was",
    "a",
    "surprisingly",
    "moving",
    "portrait",
    "of",
    "grief",
    "and",
    "hope",
    "told",
    "with",
    "wit",
    "and",
    "restraint",
]


def fixed_length_batch(tokenizer: Any, batch: int, length: int) -> dict[str, torch.Tensor]:
    """`batch` different texts, each exactly `length` tokens (no padding: the worst case for the memory)."""
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)) for i in range(batch)]
    enc = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    return dict(enc)


def make_memory(encoder: SpartanEncoder, layernorm: bool) -> TaskMemory:
    backbone = encoder.backbone
    names = tuple(encoder.layernorm_names) if layernorm else ()
    spec = MemorySpec(num_layers=backbone.num_layers, hidden_size=backbone.hidden_size, layernorm_names=names)
    memory = TaskMemory(spec)
    memory.init_layernorms(encoder.base_layernorms())
    return memory.eval()


def time_it(fn: Callable[[], object], iters: int) -> float:
    """Seconds per call, over `iters` calls."""
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="all-MiniLM-L6-v2")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    if args.smoke:
        args.batches, args.length, args.rounds = [1, 2], 16, 2
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    bare = load_backbone(args.backbone, cache_dir).model
    encoder = SpartanEncoder(load_backbone(args.backbone, cache_dir))
    memories = {"spartan": make_memory(encoder, False), "spartan+ln": make_memory(encoder, True)}
    results = []
    for batch in args.batches:
        inputs = fixed_length_batch(encoder.backbone.tokenizer, batch, args.length)
        rows = torch.arange(batch)
        contenders: dict[str, Callable[[], object]] = {"bare": lambda inputs=inputs: bare(**inputs)}
        for name, memory in memories.items():
            contenders[name] = lambda inputs=inputs, m=memory, rows=rows: encoder.forward(
                inputs, [RowGroup(m, rows)]
            )
        iters = max(1, 64 // batch) if not args.smoke else 1
        per_round: dict[str, list[float]] = {name: [] for name in contenders}
        with torch.inference_mode():
            for fn in contenders.values():
                time_it(fn, 1)  # warm-up
            for _ in range(args.rounds):
                for name, fn in contenders.items():
                    per_round[name].append(batch / time_it(fn, iters))
        cell = {"batch": batch, "length": args.length, "rounds": args.rounds, "iters_per_round": iters}
        for name, values in per_round.items():
            cell[f"{name}_examples_per_s"] = statistics.median(values)
            if name != "bare":
                ratios = [a / b for a, b in zip(values, per_round["bare"], strict=True)]
                cell[f"{name}_ratio_median"] = statistics.median(ratios)
                cell[f"{name}_ratio_min"] = min(ratios)
                cell[f"{name}_ratio_max"] = max(ratios)
        results.append(cell)
        print(json.dumps(cell), flush=True)
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {args.threads} torch threads, torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_encoder_overhead.py", *sys.argv[1:]]),
        "backbone": args.backbone,
        "results": results,
    }
    name = "bench_encoder_overhead_smoke" if args.smoke else "bench_encoder_overhead"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(report))


def render(report: dict) -> str:  # type: ignore[type-arg]
    lines = [
        f"# SPARTAN memories vs the bare backbone: forward throughput ({report['date']})",
        "",
        f"Backbone {report['backbone']}; machine: {report['machine']}; command: `{report['command']}`.",
        "Inputs are exactly `length` tokens (no padding). Throughput is the median over rounds; the ratio "
        "is computed per round (contenders alternate within a round) and shown as median [min, max].",
        "`spartan` = memories in all layers + head; `spartan+ln` also applies the task's own LayerNorms.",
        "",
        "| batch | length | bare ex/s | spartan ex/s | ratio | spartan+ln ex/s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['batch']} | {r['length']} | {r['bare_examples_per_s']:.1f} | "
            f"{r['spartan_examples_per_s']:.1f} | {r['spartan_ratio_median']:.3f} "
            f"[{r['spartan_ratio_min']:.3f}, {r['spartan_ratio_max']:.3f}] | "
            f"{r['spartan+ln_examples_per_s']:.1f} | {r['spartan+ln_ratio_median']:.3f} "
            f"[{r['spartan+ln_ratio_min']:.3f}, {r['spartan+ln_ratio_max']:.3f}] |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
