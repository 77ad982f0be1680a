"""Do memory parents specialise in topics? The shipped BBC News memory (5 topics) on its test split.

Every real (non-padding) token chooses top-k parents in every layer; we count, per layer, how often each
parent is chosen by the tokens of each TRUE topic, and measure specialisation as the mutual information
I(parent; topic) in bits. Its ceiling is min(H(topic), log2(E / k)) = 1 bit for E = 16, k = 8: no
parent can take more than 1/k of a topic's choices. Two controls:
  shuffled   the same counts with the document labels permuted (`--shuffles` times; mean and max): what
             MI the clustering of tokens into documents gives by chance, with no topic information;
  untrained  a freshly initialised memory of the same spec (and the backbone's own LayerNorms): what
             routing through random parent keys picks up from the backbone's topic-laden states.
A document-level view counts, per layer, each document's most chosen parent ("majority parent") and
takes the MI between it and the topic, with its own shuffled control.
Counting uses app/spartan/routing_stats.py, the code behind the service's GET /v1/tasks/{task}/routing.

    python benchmarks/bench_routing.py          # test split -> docs/bench_routing.{json,md}, routing_bbc.png
    python benchmarks/bench_routing.py --smoke  # 10 documents, seconds (run by the tests)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine.backbone import load_backbone
from app.engine.encoder import RowGroup, SpartanEncoder
from app.settings import Settings
from app.spartan.memfile import load_memory_file
from app.spartan.memory import TaskMemory
from app.spartan.routing_stats import (
    count_choices,
    entropy_bits,
    mutual_information_bits,
    mutual_information_ceiling_bits,
    shares_per_label,
)
from app.training.datasets import Example, TaskData, load_named
from benchmarks import harness

REPO = Path(__file__).resolve().parents[1]
MEMORY_FILE = REPO / "memories" / "bbc-news.safetensors"


def document_counts(
    encoder: SpartanEncoder, memory: TaskMemory, docs: Sequence[Example], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per layer, each document's parent choices [layers, docs, parents]; the predicted topics [docs];
    the number of real tokens."""
    spec = memory.spec
    counts = torch.zeros(spec.num_layers, len(docs), spec.num_parents, dtype=torch.long)
    predicted = torch.empty(len(docs), dtype=torch.long)
    tokens = 0
    memory.eval()
    with torch.inference_mode():
        for start in range(0, len(docs), batch_size):
            batch = docs[start : start + batch_size]
            encoding = encoder.encode([ex.text for ex in batch], None, spec.max_length)
            rows = torch.arange(len(batch))
            out = encoder.forward(encoding, [RowGroup(memory, rows)], record_routing=True)
            assert out.routing is not None
            assert out.outputs[0] is not None
            mask = encoding["attention_mask"]
            # Each document is its own bucket: topic tables (true or shuffled) are sums of documents.
            counts += count_choices(out.routing[0], mask, rows + start, len(docs), spec.num_parents)
            predicted[start : start + len(batch)] = out.outputs[0].argmax(-1)
            tokens += int(mask.sum())
    return counts, predicted, tokens


def sum_by_topic(doc_counts: torch.Tensor, topics: torch.Tensor, num_topics: int) -> torch.Tensor:
    """[layers, docs, parents] -> [layers, topics, parents]."""
    layers, _, parents = doc_counts.shape
    return torch.zeros(layers, num_topics, parents, dtype=torch.long).index_add_(1, topics, doc_counts)


def majority_parents(doc_counts: torch.Tensor) -> torch.Tensor:
    """Each document's most chosen parent per layer [layers, docs].

    Ties are common (with k = 8 of 16, several parents are often chosen by every token of a document);
    they go to the parent used least over all documents, the most distinctive one. That uses no labels,
    so the shuffled control sees the same majority parents.
    """
    overall = doc_counts.sum(1, keepdim=True).to(torch.float64)  # [layers, 1, parents]
    # Below 1, so it only decides between parents with equal counts.
    tie_break = overall / (overall.sum(-1, keepdim=True) + 1)
    return (doc_counts.to(torch.float64) - tie_break).argmax(-1)


def majority_parent_counts(doc_counts: torch.Tensor, topics: torch.Tensor, num_topics: int) -> torch.Tensor:
    """Per layer, documents per (topic, majority parent) [layers, topics, parents]."""
    one_hot = torch.nn.functional.one_hot(majority_parents(doc_counts), doc_counts.shape[-1])
    return sum_by_topic(one_hot, topics, num_topics)


def mi_per_layer(counts: torch.Tensor) -> list[float]:
    return [mutual_information_bits(layer) for layer in counts]


def shuffled_mi(
    doc_counts: torch.Tensor,
    topics: torch.Tensor,
    num_topics: int,
    shuffles: int,
    seed: int,
    *,
    majority: bool,
) -> dict[str, list[float]]:
    """MI per layer with the document labels permuted: mean and max over `shuffles` permutations."""
    generator = torch.Generator().manual_seed(seed)
    table = majority_parent_counts if majority else sum_by_topic
    runs = []
    for _ in range(shuffles):
        permuted = topics[torch.randperm(len(topics), generator=generator)]
        runs.append(mi_per_layer(table(doc_counts, permuted, num_topics)))
    by_layer = list(zip(*runs, strict=True))
    return {"mean": [statistics.mean(v) for v in by_layer], "max": [max(v) for v in by_layer]}


def untrained_like(encoder: SpartanEncoder, trained: TaskMemory, seed: int) -> TaskMemory:
    """A fresh memory of the same spec: N(0, 0.02) keys and values, the backbone's own LayerNorms."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        memory = TaskMemory(trained.spec)
    memory.init_layernorms(encoder.base_layernorms())
    return memory.eval()


def top_parents_by_lift(topic_counts: torch.Tensor, labels: Sequence[str], top: int = 3) -> dict[str, list]:
    """Per topic, the parents most over-chosen relative to all topics: lift = topic share / overall share."""
    shares = shares_per_label(topic_counts)
    overall = shares_per_label(topic_counts.sum(0, keepdim=True))[0]
    lift = torch.where(overall > 0, shares / overall.clamp_min(1e-12), torch.zeros_like(shares))
    result = {}
    for label, row, share in zip(labels, lift, shares, strict=True):
        best = row.argsort(descending=True)[:top].tolist()
        result[label] = [{"parent": p, "lift": float(row[p]), "share": float(share[p])} for p in best]
    return result


def analyse(
    name: str,
    encoder: SpartanEncoder,
    memory: TaskMemory,
    docs: Sequence[Example],
    topics: torch.Tensor,
    labels: Sequence[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Every statistic of one memory on the documents (token-level, controls, document-level)."""
    doc_counts, predicted, tokens = document_counts(encoder, memory, docs, args.batch_size)
    topic_counts = sum_by_topic(doc_counts, topics, len(labels))
    majority = majority_parent_counts(doc_counts, topics, len(labels))
    mi = mi_per_layer(topic_counts)
    best_layer = max(range(len(mi)), key=mi.__getitem__)
    topic_entropy = entropy_bits(topic_counts[0].sum(-1))
    result = {
        "memory": name,
        "accuracy": float((predicted == topics).float().mean()),
        "tokens": tokens,
        "topic_entropy_bits": topic_entropy,
        "mi_ceiling_bits": mutual_information_ceiling_bits(
            topic_entropy, memory.spec.num_parents, memory.spec.top_k
        ),
        "mi_bits": mi,
        "shuffled_mi_bits": shuffled_mi(
            doc_counts, topics, len(labels), args.shuffles, args.seed, majority=False
        ),
        "parent_entropy_bits": [entropy_bits(layer.sum(0)) for layer in topic_counts],
        "document_topic_entropy_bits": entropy_bits(torch.bincount(topics, minlength=len(labels))),
        "document_mi_bits": mi_per_layer(majority),
        "document_shuffled_mi_bits": shuffled_mi(
            doc_counts, topics, len(labels), args.shuffles, args.seed, majority=True
        ),
        "distinct_majority_parents": [int((layer.sum(0) > 0).sum()) for layer in majority],
        "best_layer": best_layer,
        "top_parents_best_layer": top_parents_by_lift(topic_counts[best_layer], labels),
        "topic_counts": topic_counts.tolist(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "topic_counts"}), flush=True)
    return result


def pick_documents(data: TaskData, smoke: bool, split: str) -> list[Example]:
    docs: list[Example] = getattr(data, split)
    if not smoke:
        return docs
    per_topic = {label: [ex for ex in docs if ex.label == label][:2] for label in data.labels}
    return [ex for examples in per_topic.values() for ex in examples]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--split", choices=["train", "dev", "test"], default="test")
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.smoke:
        args.shuffles = 3
    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    encoder = SpartanEncoder(load_backbone("all-MiniLM-L6-v2", cache_dir))
    trained = load_memory_file(MEMORY_FILE, encoder.identity())
    data = load_named("bbc", cache_dir)  # the seeded split the memory was trained on (docs/MEMORIES.md)
    if tuple(trained.spec.labels) != data.labels:
        raise SystemExit(f"memory labels {trained.spec.labels} differ from the dataset's {data.labels}")
    docs = pick_documents(data, args.smoke, args.split)
    topics = torch.tensor([int(data.label_index(ex)) for ex in docs])
    labels = list(data.labels)
    report = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} torch threads, "
        f"torch {torch.__version__}",
        "command": " ".join(["python", "benchmarks/bench_routing.py", *sys.argv[1:]]),
        "memory_file": str(MEMORY_FILE.relative_to(REPO)),
        "memory_version": trained.version,
        "split": args.split,
        "documents": len(docs),
        "documents_per_topic": dict(
            zip(labels, torch.bincount(topics, minlength=len(labels)).tolist(), strict=True)
        ),
        "labels": labels,
        "num_parents": trained.spec.num_parents,
        "top_k": trained.spec.top_k,
        "max_length": trained.spec.max_length,
        "shuffles": args.shuffles,
        "results": [
            analyse(name, encoder, memory, docs, topics, labels, args)
            for name, memory in (
                ("trained", trained),
                ("untrained", untrained_like(encoder, trained, args.seed)),
            )
        ],
    }
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_routing{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    figure = args.out / f"routing_bbc{suffix}.png"
    plot_heatmaps(report, figure)
    (args.out / f"bench_routing{suffix}.md").write_text(render(report, figure.name))


def plot_heatmaps(report: dict[str, Any], path: Path) -> None:
    """One panel per layer (columns); the trained memory on top, the untrained control below."""
    plt = harness.pyplot()

    results = report["results"]
    layers = len(results[0]["mi_bits"])
    top_k, labels = report["top_k"], report["labels"]
    fig, axes = plt.subplots(
        len(results),
        layers,
        figsize=(3.1 * layers, 2.8 * len(results) + 0.9),
        squeeze=False,
        gridspec_kw={"hspace": 0.55},
    )
    image = None
    for row, result in enumerate(results):
        for layer in range(layers):
            ax = axes[row][layer]
            shares = shares_per_label(torch.tensor(result["topic_counts"][layer])).numpy()
            # A parent chosen by every token of a topic has share 1/k: the top of the scale.
            image = ax.imshow(shares, vmin=0, vmax=1 / top_k, cmap="viridis", aspect="auto")
            shuffled = result["shuffled_mi_bits"]["max"][layer]
            ax.set_title(
                f"{result['memory']}, layer {layer}\nMI {result['mi_bits'][layer]:.3f} bits "
                f"(shuffled max {shuffled:.3f})",
                fontsize=8,
            )
            ax.set_yticks(range(len(labels)), labels if layer == 0 else [""] * len(labels), fontsize=7)
            ax.set_xticks(range(0, report["num_parents"], 3))
            ax.tick_params(axis="x", labelsize=7)
            if row == len(results) - 1:
                ax.set_xlabel("parent", fontsize=8)
    assert image is not None
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the topic's token choices")
    fig.suptitle(
        f"BBC News {report['split']} split ({report['documents']} documents): how often each parent is "
        f"chosen per topic (rows normalised; even use = 1/{report['num_parents']})",
        fontsize=10,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def render(report: dict[str, Any], figure: str) -> str:
    trained, untrained = report["results"]
    ceiling, even = trained["mi_ceiling_bits"], math.log2(report["num_parents"])
    lines = [
        f"# Do SPARTAN parents specialise in topics? BBC News ({report['date']})",
        "",
        f"Memory `{report['memory_file']}` (version {report['memory_version'][:12]}), {report['split']} "
        f"split: {report['documents']} documents ({trained['tokens']:,} real tokens, max length "
        f"{report['max_length']}), E = {report['num_parents']} parents, k = {report['top_k']} per token "
        f"per layer. Machine: {report['machine']}. Command: `{report['command']}`.",
        f"Accuracy on these documents: trained {trained['accuracy']:.3f}, "
        f"untrained {untrained['accuracy']:.3f}.",
        "",
        f"Token level: MI(parent; true topic) over every token choice, in bits. Its ceiling is "
        f"min(H(topic) = {trained['topic_entropy_bits']:.2f}, log2(E / k)) = {ceiling:.2f} bits: no "
        "parent can take more than 1/k of a topic's choices. Shuffled = document labels permuted "
        f"({report['shuffles']} times: mean / max). Untrained = a fresh memory of the same spec.",
        "",
        "| layer | trained MI | % of ceiling | shuffled mean / max | untrained MI | untrained shuffled "
        f"mean / max | parent entropy trained / untrained (even use: {even:.2f}) |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, mi in enumerate(trained["mi_bits"]):
        ts, us = trained["shuffled_mi_bits"], untrained["shuffled_mi_bits"]
        lines.append(
            f"| {layer} | **{mi:.3f}** | {100 * mi / ceiling:.1f}% | {ts['mean'][layer]:.4f} / "
            f"{ts['max'][layer]:.4f} | {untrained['mi_bits'][layer]:.3f} | {us['mean'][layer]:.4f} / "
            f"{us['max'][layer]:.4f} | {trained['parent_entropy_bits'][layer]:.2f} / "
            f"{untrained['parent_entropy_bits'][layer]:.2f} |"
        )
    lines += [
        "",
        "Document level: each document's majority parent per layer; MI(majority parent; topic) over "
        f"documents (ceiling H(topic) = {trained['document_topic_entropy_bits']:.2f} bits). With few "
        "documents per cell this estimate is biased upwards, hence its own shuffled control.",
        "",
        "| layer | trained MI | shuffled mean / max | distinct majority parents | untrained MI | "
        "shuffled mean / max | distinct majority parents |",
        "|---|---|---|---|---|---|---|",
    ]
    for layer, mi in enumerate(trained["document_mi_bits"]):
        ts, us = trained["document_shuffled_mi_bits"], untrained["document_shuffled_mi_bits"]
        lines.append(
            f"| {layer} | **{mi:.3f}** | {ts['mean'][layer]:.3f} / {ts['max'][layer]:.3f} | "
            f"{trained['distinct_majority_parents'][layer]} | {untrained['document_mi_bits'][layer]:.3f} | "
            f"{us['mean'][layer]:.3f} / {us['max'][layer]:.3f} | "
            f"{untrained['distinct_majority_parents'][layer]} |"
        )
    best = trained["best_layer"]
    lines += [
        "",
        f"Trained memory, layer {best} (its highest MI): per topic, the parents most over-chosen "
        "relative to all topics (lift = the topic's share / the overall share; share = of the topic's "
        "token choices, at most 1/k).",
        "",
        "| topic | parent (lift, share) |",
        "|---|---|",
    ]
    for label, parents in trained["top_parents_best_layer"].items():
        cells = ", ".join(f"{p['parent']} ({p['lift']:.2f}x, {p['share']:.3f})" for p in parents)
        lines.append(f"| {label} | {cells} |")
    lines += ["", f"![routing heatmaps]({figure})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
