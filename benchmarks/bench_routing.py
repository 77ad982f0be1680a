"""Do memory parents specialise in topics? MI(parent; topic) per layer of the shipped BBC News memory,
against shuffled-label and untrained-memory controls. Method: docs/BENCHMARKS.md, "Parent specialisation".

    python benchmarks/bench_routing.py          # test split -> docs/bench_routing.{json,md}, routing_bbc.png
    python benchmarks/bench_routing.py --smoke  # 10 documents, seconds (run by the tests)
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine.encoder import RowGroup, SpartanEncoder
from app.settings import Settings
from app.spartan import routing_stats as stats  # the counting behind GET /v1/tasks/{task}/routing
from app.spartan.memory import TaskMemory
from app.training.datasets import Example, load_named
from benchmarks import harness


def document_counts(
    encoder: SpartanEncoder, memory: TaskMemory, docs: Sequence[Example], batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per layer, each document's parent choices [layers, docs, parents]; the predicted topics [docs];
    the number of real tokens."""
    spec = memory.spec
    counts = torch.zeros(spec.num_layers, len(docs), spec.num_parents, dtype=torch.long)
    predicted, tokens = torch.empty(len(docs), dtype=torch.long), 0
    memory.eval()
    with torch.inference_mode():
        for start in range(0, len(docs), batch_size):
            batch = docs[start : start + batch_size]
            encoding = encoder.encode([ex.text for ex in batch], None, spec.max_length)
            rows = torch.arange(len(batch))
            out = encoder.forward(encoding, [RowGroup(memory, rows)], record_routing=True)
            assert out.routing is not None
            assert out.outputs[0] is not None
            # Each document is its own bucket: topic tables (true or shuffled) are sums of documents.
            mask = encoding["attention_mask"]
            counts += stats.count_choices(out.routing[0], mask, rows + start, len(docs), spec.num_parents)
            predicted[start : start + len(batch)] = out.outputs[0].argmax(-1)
            tokens += int(mask.sum())
    return counts, predicted, tokens


def sum_by_topic(doc_counts: torch.Tensor, topics: torch.Tensor, num_topics: int) -> torch.Tensor:
    """[layers, docs, parents] -> [layers, topics, parents]."""
    layers, _, parents = doc_counts.shape
    return torch.zeros(layers, num_topics, parents, dtype=torch.long).index_add_(1, topics, doc_counts)


def majority_parent_counts(doc_counts: torch.Tensor, topics: torch.Tensor, num_topics: int) -> torch.Tensor:
    """Per layer, documents per (topic, majority parent) [layers, topics, parents]. Ties are common (with
    k = 8 of 16, several parents are often chosen by every token of a document); they go to the parent
    used least over all documents, the most distinctive one. That uses no labels, so the shuffled control
    sees the same majority parents."""
    overall = doc_counts.sum(1, keepdim=True).to(torch.float64)  # [layers, 1, parents]
    tie_break = overall / (overall.sum(-1, keepdim=True) + 1)  # below 1: decides only between equal counts
    majority = (doc_counts.to(torch.float64) - tie_break).argmax(-1)
    return sum_by_topic(torch.nn.functional.one_hot(majority, doc_counts.shape[-1]), topics, num_topics)


def mi_per_layer(counts: torch.Tensor) -> list[float]:
    return [stats.mutual_information_bits(layer) for layer in counts]


def shuffled_mi(tables: Iterable[torch.Tensor]) -> dict[str, list[float]]:
    """MI per layer of count tables with permuted document labels: mean and max over the permutations."""
    by_layer = list(zip(*map(mi_per_layer, tables), strict=True))
    return {"mean": [statistics.mean(v) for v in by_layer], "max": [max(v) for v in by_layer]}


def top_parents_by_lift(topic_counts: torch.Tensor, labels: Sequence[str], top: int = 3) -> dict[str, list]:
    """Per topic, the parents most over-chosen relative to all topics: lift = topic share / overall share."""
    shares = stats.shares_per_label(topic_counts)
    overall = stats.shares_per_label(topic_counts.sum(0, keepdim=True))[0]
    lift = torch.where(overall > 0, shares / overall.clamp_min(1e-12), torch.zeros_like(shares))
    return {
        label: [
            {"parent": p, "lift": float(row[p]), "share": float(share[p])}
            for p in row.argsort(descending=True)[:top].tolist()
        ]
        for label, row, share in zip(labels, lift, shares, strict=True)
    }


def analyse(name: str, encoder: SpartanEncoder, memory: TaskMemory, docs: Sequence[Example],
            topics: torch.Tensor, labels: Sequence[str], args: Any) -> dict[str, Any]:  # fmt: skip
    """Every statistic of one memory on the documents (token level, controls, document level)."""
    doc_counts, predicted, tokens = document_counts(encoder, memory, docs, args.batch_size)
    num_topics = len(labels)
    topic_counts = sum_by_topic(doc_counts, topics, num_topics)
    majority = majority_parent_counts(doc_counts, topics, num_topics)
    mi = mi_per_layer(topic_counts)
    best_layer = max(range(len(mi)), key=mi.__getitem__)
    topic_entropy = stats.entropy_bits(topic_counts[0].sum(-1))
    generator = torch.Generator().manual_seed(args.seed)  # the same `--shuffles` permutations everywhere
    shuffles = [topics[torch.randperm(len(topics), generator=generator)] for _ in range(args.shuffles)]
    token_shuffled = shuffled_mi(sum_by_topic(doc_counts, t, num_topics) for t in shuffles)
    document_shuffled = shuffled_mi(majority_parent_counts(doc_counts, t, num_topics) for t in shuffles)
    spec = memory.spec
    result = {
        "memory": name, "accuracy": float((predicted == topics).float().mean()), "tokens": tokens,
        "topic_entropy_bits": topic_entropy,
        "mi_ceiling_bits": stats.mutual_information_ceiling_bits(topic_entropy, spec.num_parents, spec.top_k),
        "mi_bits": mi, "shuffled_mi_bits": token_shuffled,
        "parent_entropy_bits": [stats.entropy_bits(layer.sum(0)) for layer in topic_counts],
        "document_topic_entropy_bits": stats.entropy_bits(torch.bincount(topics, minlength=num_topics)),
        "document_mi_bits": mi_per_layer(majority),
        "document_shuffled_mi_bits": document_shuffled,
        "distinct_majority_parents": [int((layer.sum(0) > 0).sum()) for layer in majority],
        "best_layer": best_layer,
        "top_parents_best_layer": top_parents_by_lift(topic_counts[best_layer], labels),
        "topic_counts": topic_counts.tolist(),
    }  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "topic_counts"}), flush=True)
    return result


def plot(report: dict[str, Any], path: Path) -> None:
    """One panel per layer (columns); the trained memory on top, the untrained control below."""
    plt = harness.pyplot()
    results, labels = report["results"], report["labels"]
    layers = len(results[0]["mi_bits"])
    size = (3.1 * layers, 2.8 * len(results) + 0.9)
    fig, axes = plt.subplots(len(results), layers, figsize=size, squeeze=False, gridspec_kw={"hspace": 0.55})
    for row, result in enumerate(results):
        for layer, ax in enumerate(axes[row]):
            shares = stats.shares_per_label(torch.tensor(result["topic_counts"][layer])).numpy()
            # A parent chosen by every token of a topic has share 1/k: the top of the scale.
            image = ax.imshow(shares, vmin=0, vmax=1 / report["top_k"], cmap="viridis", aspect="auto")
            mi, shuffled = result["mi_bits"][layer], result["shuffled_mi_bits"]["max"][layer]
            title = f"{result['memory']}, layer {layer}\nMI {mi:.3f} bits (shuffled max {shuffled:.3f})"
            ax.set_title(title, fontsize=8)
            ax.set_yticks(range(len(labels)), labels if layer == 0 else [""] * len(labels), fontsize=7)
            ax.set_xticks(range(0, report["num_parents"], 3))
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel("parent" if row == len(results) - 1 else "", fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="share of the topic's token choices")
    fig.suptitle(f"BBC News {report['split']} split ({report['documents']} documents): how often each "
                 f"parent is chosen per topic (rows normalised; even use = 1/{report['num_parents']})",
                 fontsize=10)  # fmt: skip
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    trained, untrained = report["results"]
    ceiling, even = trained["mi_ceiling_bits"], math.log2(report["num_parents"])

    def pair(entry: dict[str, list[float]], layer: int, digits: int) -> str:
        return f"{entry['mean'][layer]:.{digits}f} / {entry['max'][layer]:.{digits}f}"

    tokens = [
        (layer, f"**{mi:.3f}**", f"{100 * mi / ceiling:.1f}%", pair(trained["shuffled_mi_bits"], layer, 4),
         f"{untrained['mi_bits'][layer]:.3f}", pair(untrained["shuffled_mi_bits"], layer, 4),
         f"{trained['parent_entropy_bits'][layer]:.2f} / {untrained['parent_entropy_bits'][layer]:.2f}")
        for layer, mi in enumerate(trained["mi_bits"])
    ]  # fmt: skip
    documents = [
        (layer, f"**{mi:.3f}**", pair(trained["document_shuffled_mi_bits"], layer, 3),
         trained["distinct_majority_parents"][layer], f"{untrained['document_mi_bits'][layer]:.3f}",
         pair(untrained["document_shuffled_mi_bits"], layer, 3),
         untrained["distinct_majority_parents"][layer])
        for layer, mi in enumerate(trained["document_mi_bits"])
    ]  # fmt: skip
    lifts = [(label, ", ".join(f"{p['parent']} ({p['lift']:.2f}x, {p['share']:.3f})" for p in parents))
             for label, parents in trained["top_parents_best_layer"].items()]  # fmt: skip
    head = ("layer", "trained MI", "shuffled mean / max", "distinct majority parents", "untrained MI",
            "shuffled mean / max", "distinct majority parents")  # fmt: skip
    return "\n".join([
        f"# Do SPARTAN parents specialise in topics? BBC News ({report['environment']['date']})",
        "",
        harness.header(report),
        "",
        f"Memory `{report['memory_file']}` (version {report['memory_version'][:12]}), {report['split']}"
        f" split: {report['documents']} documents ({trained['tokens']:,} real tokens, max length"
        f" {report['max_length']}), E = {report['num_parents']} parents, k = {report['top_k']} per token per"
        f" layer. Accuracy on these documents: trained {trained['accuracy']:.3f}, untrained"
        f" {untrained['accuracy']:.3f}. Method and controls: docs/BENCHMARKS.md, section 4.",
        "",
        f"Token level: MI(parent; true topic) in bits; its ceiling min(H(topic) = "
        f"{trained['topic_entropy_bits']:.2f}, log2(E / k)) = {ceiling:.2f} bits. Shuffled: "
        f"{report['shuffles']} label permutations.",
        "",
        *harness.table(("layer", "trained MI", "% of ceiling", "shuffled mean / max", "untrained MI",
                        "untrained shuffled mean / max",
                        f"parent entropy trained / untrained (even use: {even:.2f})"), tokens),
        "",
        "Document level: MI(majority parent; topic) over documents (ceiling H(topic) = "
        f"{trained['document_topic_entropy_bits']:.2f} bits).",
        "",
        *harness.table(head, documents),
        "",
        f"Trained memory, layer {trained['best_layer']} (its highest MI): per topic, the parents most "
        "over-chosen relative to all topics (lift = the topic's share / the overall share; share of the "
        "topic's token choices, at most 1/k).",
        "",
        *harness.table(("topic", "parent (lift, share)"), lifts),
        "",
        f"![routing heatmaps](routing_bbc{'_smoke' if report['smoke'] else ''}.png)",
        "",
    ])  # fmt: skip


def main() -> None:
    cli = harness.parser(__doc__)
    cli.add_argument("--split", choices=["train", "dev", "test"], default="test")
    cli.add_argument("--shuffles", type=int, default=20)
    cli.add_argument("--batch-size", type=int, default=32)
    cli.add_argument("--seed", type=int, default=0)
    args = cli.parse_args()
    args.shuffles = 3 if args.smoke else args.shuffles
    torch.set_num_threads(args.threads)
    encoder = harness.encoder()
    trained = harness.shipped_memories(encoder)["bbc-news"]
    data = load_named("bbc", Settings().cache_dir)  # the seeded split the memory was trained on (MEMORIES.md)
    if tuple(trained.spec.labels) != data.labels:
        raise SystemExit(f"memory labels {trained.spec.labels} differ from the dataset's {data.labels}")
    docs: list[Example] = getattr(data, args.split)
    if args.smoke:  # two documents per topic
        docs = [ex for label in data.labels for ex in [d for d in docs if d.label == label][:2]]
    topics, labels = torch.tensor([int(data.label_index(ex)) for ex in docs]), list(data.labels)
    untrained = harness.fresh_memory(encoder, trained.spec, seed=args.seed)
    report: dict[str, Any] = {
        "environment": harness.environment(threads=args.threads),
        "command": harness.command_line("bench_routing.py"), "memory_file": "memories/bbc-news.safetensors",
        "memory_version": trained.version, "split": args.split, "documents": len(docs), "labels": labels,
        "documents_per_topic": dict(zip(labels, torch.bincount(topics, minlength=len(labels)).tolist(),
                                        strict=True)),
        "num_parents": trained.spec.num_parents, "top_k": trained.spec.top_k, "smoke": args.smoke,
        "max_length": trained.spec.max_length, "shuffles": args.shuffles,
    }  # fmt: skip
    memories = {"trained": trained, "untrained": untrained}
    report["results"] = [analyse(n, encoder, m, docs, topics, labels, args) for n, m in memories.items()]
    figure = args.out / f"routing_bbc{'_smoke' if args.smoke else ''}.png"
    args.out.mkdir(parents=True, exist_ok=True)
    plot(report, figure)
    harness.finish(args.out, "bench_routing", report, render, smoke=args.smoke)


if __name__ == "__main__":
    main()
