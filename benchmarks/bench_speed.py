"""Inference speed of SPARTAN against the bare backbone, bottleneck adapters and LoRA, side by side, under
three profiles (server, edge, edge-int8). Runs in the peers' environment (`make peers-env`; the
contenders come from benchmarks/peers.py). Contenders, profiles, timing and goals: docs/BENCHMARKS.md,
"Inference speed"; the accuracy int8 keeps: `python benchmarks/bench_engine.py accuracy`.

    .venv-peers/bin/python benchmarks/bench_speed.py      # full run (~15 min on 2 quiet cores, estimated)
    .venv-peers/bin/python benchmarks/bench_speed.py --smoke --out /tmp/speed   # seconds; the tests run it
"""

from __future__ import annotations

import gc
import itertools
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.nn.quantized import dynamic as nnqd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.settings import Settings
from benchmarks import harness
from benchmarks.peers import Built, MethodUnavailable, TaskModel, build

CONTENDERS = ("bare", "spartan", "pfeiffer", "houlsby", "lora")
ADAPTERS = ("pfeiffer", "houlsby")
PROFILES = {"server": (None, False), "edge": (1, False), "edge-int8": (1, True)}  # (threads, int8)
GOAL_VS_BARE, GOAL_VS_ADAPTERS = 0.97, 1.0
CLOSE_COSINE = 0.95  # int8 pooled output vs float32: below this the int8 model is not a faithful copy
PAPER_CLAIM = 1.9  # "inference throughput more than 90% higher than adapters" (abstract, Raspberry Pi 4)


def build_contenders(backbone: str, names: list[str]) -> tuple[dict[str, Built], dict[str, str]]:
    built, missing = {}, {}
    for name in names:
        try:
            built[name] = build(name, backbone, Settings().cache_dir, num_outputs=2)
        except MethodUnavailable as err:
            missing[name] = str(err)
        else:
            built[name].model.eval().requires_grad_(False)
    return built, missing


def pooled_output(model: TaskModel, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled final hidden state the head sees (the bare model returns it directly)."""
    head = getattr(getattr(model, "memory", None), "head", None) or getattr(model, "head", None)
    if head is None:
        return model(encoding)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        model(encoding)
    finally:
        handle.remove()
    return captured[0]


def quantize_contenders(built: dict[str, Built], probe: dict[str, Any], scheme: str) -> dict[str, Any]:
    """int8 on every contender's backbone; the cosine of its pooled output against float32."""
    names = [n for n, m in built["bare"].backbone.model.named_modules() if type(m) is nn.Linear]
    report = {}
    for name, one in built.items():
        with torch.inference_mode():
            before = pooled_output(one.model, probe).float()
        info = report[name] = harness.int8_backbone(one.backbone.model, scheme, names)
        with torch.inference_mode():
            cosine = nn.functional.cosine_similarity(before, pooled_output(one.model, probe).float(), dim=-1)
        # the whole task model: per-task Linear modules (head, bottlenecks, LoRA A/B) must stay float32
        info["model_quantized"] = sum(isinstance(m, nnqd.Linear) for m in one.model.modules())
        info["model_float_linears"] = sum(type(m) is nn.Linear for m in one.model.modules())
        info.update(pooled_cosine_min=float(cosine.min()), pooled_cosine_mean=float(cosine.mean()))
        info.update(int8=info["quantized"] > 0, output_close=info["pooled_cosine_min"] >= CLOSE_COSINE)
        counts = f"{info['quantized']}/{info['backbone_linears']} quantised {info['how']}"
        print(f"  int8 {name}: {counts}, pooled cosine min {info['pooled_cosine_min']:.4f}", flush=True)
    return report


def ratio_series(per_round: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-round throughput ratios; within a round the contenders shared the machine's state."""
    series = dict(per_round)
    if adapters := [a for a in ADAPTERS if a in per_round]:
        series["best_adapter"] = [max(v) for v in zip(*(per_round[a] for a in adapters), strict=True)]
    pairs = [(name, "bare") for name in per_round if name != "bare"]
    pairs += [("spartan", p) for p in (*adapters, "lora", "best_adapter") if p in series]
    pairs += [("bare", "best_adapter")] if adapters else []
    return {f"{a}/{b}": [x / y for x, y in zip(series[a], series[b], strict=True)] for a, b in pairs}


def with_spread(values: list[float]) -> dict[str, Any]:
    return {"per_round": values, **harness.spread(values)}


def run_cell(models: dict[str, TaskModel], encoding: dict[str, torch.Tensor], args: Any) -> tuple[int, Any]:
    """Calibrated, rotated rounds of every contender on one input, with the garbage collector off."""
    calls = {name: (lambda m=model: m(encoding)) for name, model in models.items()}
    batch = int(encoding["input_ids"].shape[0])
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            reps = harness.calibrate(calls, args.target_seconds)
            return reps, harness.alternate(calls, rounds=args.rounds, items_per_call=batch, calls=reps)
    finally:
        gc.enable()


def run_profile(backbone: str, profile: str, built: dict[str, Built], args: Any) -> list[dict[str, Any]]:
    threads, int8 = PROFILES[profile]
    threads = threads or args.threads
    torch.set_num_threads(threads)
    models, cells = {name: one.model for name, one in built.items()}, []
    for batch, length in itertools.product(args.batches, args.lengths):
        encoding = harness.fixed_length_batch(built["bare"].backbone.tokenizer, batch, length)
        reps, per_round = run_cell(models, encoding, args)
        ratios = {key: with_spread(v) for key, v in ratio_series(per_round).items()}
        cell = dict(backbone=backbone, profile=profile, threads=threads, int8=int8, batch=batch)
        cell.update(length=length, reps=reps, rounds=args.rounds, ratios=ratios)
        cell["examples_per_s"] = {name: with_spread(v) for name, v in per_round.items()}
        best = ratios.get("spartan/best_adapter")
        cell["goals"] = {
            "spartan_vs_bare": ratios["spartan/bare"]["median"] >= GOAL_VS_BARE,
            "spartan_vs_adapters": None if best is None else best["median"] >= GOAL_VS_ADAPTERS,
        }
        cells.append(cell)
        medians = " ".join(f"{n}={v['median']:.1f}" for n, v in cell["examples_per_s"].items())
        where = f"{backbone} {profile} b{batch} L{length} x{reps}"
        print(f"[{where}] ex/s {medians}; spartan/bare {ratios['spartan/bare']['median']:.3f}", flush=True)
    return cells


def flop_shares(hidden: int, intermediate: int, length: int) -> dict[str, float]:
    """Extra FLOPs per token per layer of each method, as a fraction of the layer's own FLOPs."""
    layer = 2 * (4 * hidden * hidden + 2 * hidden * intermediate) + 4 * length * hidden
    return {
        "pfeiffer": 2 * 2 * hidden * (hidden // 16) / layer,
        "houlsby": 2 * 2 * 2 * hidden * (hidden // 16) / layer,
        "lora": 2 * 2 * (2 * 8 * hidden) / layer,
        "spartan": 2 * (16 * hidden + 2 * 8 * 3 * hidden) / layer,  # parents E*H; k*C keys and values
    }


def summarise(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for profile, backbone in itertools.product(PROFILES, dict.fromkeys(c["backbone"] for c in cells)):
        mine = [c for c in cells if (c["profile"], c["backbone"]) == (profile, backbone)]
        if not mine:
            continue
        ratios = [c["ratios"] for c in mine]
        vs_bare = [r["spartan/bare"]["median"] for r in ratios]
        vs_adapters = [c["goals"]["spartan_vs_adapters"] for c in mine]
        ceiling = [r["bare/best_adapter"]["median"] for r in ratios if "bare/best_adapter" in r]
        row = dict(profile=profile, backbone=backbone, cells=len(mine))
        row["spartan_vs_bare_met"] = sum(c["goals"]["spartan_vs_bare"] for c in mine)
        row.update(spartan_vs_bare_worst=min(vs_bare), spartan_vs_bare_median=statistics.median(vs_bare))
        row["spartan_vs_adapters_met"] = None if None in vs_adapters else sum(map(bool, vs_adapters))
        row["bare_vs_best_adapter_max"] = max(ceiling) if ceiling else None
        rows.append(row)
    return rows


def fmt_ratio(entry: dict[str, Any] | None, goal: float) -> str:
    return (
        "—" if entry is None else f"{harness.fmt_spread(entry, 3)} {'✓' if entry['median'] >= goal else '✗'}"
    )


def summary_table(summary: list[dict[str, Any]]) -> list[str]:
    head = ("profile", "backbone", "cells", "SPARTAN/bare ≥ 0.97", "SPARTAN/bare median (worst)")
    head += ("SPARTAN ≥ best adapter", "bare/best adapter (max)")
    rows = []
    for s in summary:
        met, ceiling, n = s["spartan_vs_adapters_met"], s["bare_vs_best_adapter_max"], s["cells"]
        vs_bare = f"{s['spartan_vs_bare_median']:.3f} ({s['spartan_vs_bare_worst']:.3f})"
        row = (s["profile"], s["backbone"], n, f"{s['spartan_vs_bare_met']}/{n}", vs_bare)
        vs_adapters = "—" if met is None else f"{met}/{n}"
        rows.append((*row, vs_adapters, "—" if ceiling is None else f"{ceiling:.3f}"))
    return harness.table(head, rows)


def profile_table(cells: list[dict[str, Any]], contenders: list[str]) -> list[str]:
    head = ("backbone", "batch", "length", "reps", *(f"{c} ex/s" for c in contenders), "SPARTAN/bare")
    head += ("SPARTAN/best adapter", "SPARTAN/lora")
    goals = {"spartan/bare": GOAL_VS_BARE, "spartan/best_adapter": GOAL_VS_ADAPTERS, "spartan/lora": 1.0}
    rows = []
    for c in cells:
        speeds = [harness.fmt_spread(c["examples_per_s"].get(n)) for n in contenders]
        ratios = [fmt_ratio(c["ratios"].get(key), goal) for key, goal in goals.items()]
        rows.append((c["backbone"], c["batch"], c["length"], c["reps"], *speeds, *ratios))
    return harness.table(head, rows)


def quantization_lines(report: dict[str, Any]) -> list[str]:
    rows = []
    for backbone, per in report["quantization"].items():
        for name, q in per.items():
            how = "; ".join(f"{k}: {v}" for k, v in q["how"].items())
            quantised, cosine = f"{q['quantized']}/{q['backbone_linears']}", f"{q['pooled_cosine_min']:.4f}"
            rows.append((backbone, name, quantised, how, len(q["skipped"]), cosine))
    head = ("backbone", "contender", "quantised", "how", "skipped", "pooled cosine min")
    return [
        "",
        f"Which contenders ran int8 ({report['settings']['int8_scheme']} weight scales; cosine of the pooled "
        f"output int8 vs float32 on a probe batch of 4 rows; below {CLOSE_COSINE} the int8 model is no "
        "faithful copy):",
        "",
        *harness.table(head, rows),
    ]


def render(report: dict[str, Any]) -> str:
    contenders = report["settings"]["contenders"]
    lines = [
        f"# Inference speed: SPARTAN vs bare backbone, adapters and LoRA ({report['environment']['date']})",
        "",
        harness.header(report),
        "",
        "Method and contenders: docs/BENCHMARKS.md, section 4. — = not available "
        "(`adapters` has no MPNet support).",
        "",
        "## Summary",
        "",
        *summary_table(report["summary"]),
    ]
    for profile in report["profiles"]:
        cells = [c for c in report["cells"] if c["profile"] == profile["name"]]
        lines += ["", f"## Profile `{profile['name']}`: {profile['description']}", ""]
        lines += profile_table(cells, contenders)
    if report["quantization"]:
        lines += quantization_lines(report)
    if speedups := int8_speedups(report["cells"]):
        rows = [
            (*key, *(f"{v[c]:.2f}x" if c in v else "—" for c in contenders)) for key, v in speedups.items()
        ]
        note = (
            "edge-int8 ex/s over edge ex/s (medians of two separate runs, so machine drift does not cancel):"
        )
        table = harness.table(("backbone", "batch", "length", *contenders), rows)
        lines += ["", "## int8 speed-up at 1 thread", "", note, "", *table]
    return "\n".join([*lines, "", *paper_gap(report)]) + "\n"


def int8_speedups(cells: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, float]]:
    by_key = {(c["backbone"], c["batch"], c["length"], c["profile"]): c["examples_per_s"] for c in cells}
    return {
        key[:3]: {n: e["median"] / by_key[(*key[:3], "edge")][n]["median"] for n, e in speeds.items()}
        for key, speeds in by_key.items()
        if key[3] == "edge-int8" and (*key[:3], "edge") in by_key
    }


def paper_gap(report: dict[str, Any]) -> list[str]:
    """The measured ceiling of any gain over the adapters against the paper's claim."""
    ceilings = [s["bare_vs_best_adapter_max"] for s in report["summary"] if s["bare_vs_best_adapter_max"]]
    flops, ceiling = report["flop_shares"], max(ceilings, default=0.0)
    shares = [f"{b}: " + ", ".join(f"{n} +{100 * v:.1f}%" for n, v in s.items()) for b, s in flops.items()]
    if not ceilings:
        verdict = "No adapter ran here (the `adapters` library does not support this backbone)."
    elif ceiling < PAPER_CLAIM:
        verdict = f"bare/best adapter is at most {ceiling:.3f}, below {PAPER_CLAIM}x in every cell: "
        verdict += "this comparison cannot reproduce the claim (docs/RESULTS.md, section 2)."
    else:
        verdict = f"bare/best adapter reaches {ceiling:.3f}: {PAPER_CLAIM}x is possible there in principle."
    return [
        f"## The gap to the paper's {PAPER_CLAIM}x",
        "",
        f"Extra FLOPs per token per layer, as a share of the layer's own (length 128): {'; '.join(shares)}. "
        "SPARTAN does all the work of `bare` plus its memory, so bare/best adapter bounds what any method "
        f"that runs the backbone in full can gain over the adapters. {verdict}",
    ]


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()
    profiles = [p["name"] for p in report["profiles"]]
    peers = [c for c in report["settings"]["contenders"] if c != "bare"]
    width = 0.8 / len(peers)
    fig, axes = plt.subplots(len(profiles), 1, figsize=(12, 3.6 * len(profiles)), squeeze=False)
    for ax, profile in zip(axes[:, 0], profiles, strict=True):
        cells = [c for c in report["cells"] if c["profile"] == profile]
        for number, name in enumerate(peers):
            bars = [
                (i, c["ratios"][f"{name}/bare"]) for i, c in enumerate(cells) if f"{name}/bare" in c["ratios"]
            ]
            xs = [i + (number - (len(peers) - 1) / 2) * width for i, _ in bars]
            errors = [[e["median"] - e["min"] for _, e in bars], [e["max"] - e["median"] for _, e in bars]]
            ax.bar(xs, [e["median"] for _, e in bars], width, yerr=errors, capsize=2, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(GOAL_VS_BARE, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL_VS_BARE}")
        labels = [f"{c['backbone']}\nb{c['batch']} L{c['length']}" for c in cells]
        ax.set_xticks(range(len(cells)), labels, fontsize=7)
        title = f"profile {profile}: median per-round ratio to bare [min, max]"
        ax.set(ylabel="ex/s relative to bare", title=title)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    harness.save_figure(fig, path, dpi=110)


def profiles(args: Any) -> list[dict[str, Any]]:
    chosen = []
    for name, (threads, int8) in PROFILES.items():
        if name in args.profiles:
            threads = threads or args.threads
            description = f"{threads} torch thread(s), " + ("backbone Linears int8" if int8 else "float32")
            chosen.append(dict(name=name, threads=threads, int8=int8, description=description))
    return chosen


def run_backbone(backbone: str, report: dict[str, Any], args: Any) -> None:
    """Every chosen profile on `backbone`; the int8 profiles on contenders of their own (int8 changes
    them in place)."""
    for int8 in (False, True):
        group = [p["name"] for p in report["profiles"] if p["int8"] == int8]
        if not group:
            continue
        print(f"building {backbone} contenders ({', '.join(group)})", flush=True)
        built, report["missing"][backbone] = build_contenders(backbone, args.contenders)
        config = built["bare"].backbone.model.config
        report["flop_shares"][backbone] = flop_shares(config.hidden_size, config.intermediate_size, 128)
        if int8:
            torch.set_num_threads(1)
            probe = harness.fixed_length_batch(built["bare"].backbone.tokenizer, 4, min(args.lengths))
            report["quantization"][backbone] = quantize_contenders(built, probe, args.int8_scheme)
        for profile in group:
            report["cells"] += run_profile(backbone, profile, built, args)
        del built
        gc.collect()


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS, name="speed_inference", rounds=5)
    cli.add_argument("--backbones", nargs="+", default=["minilm", "mpnet"])
    cli.add_argument("--profiles", nargs="+", choices=list(PROFILES), default=list(PROFILES))
    cli.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    cli.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    cli.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    timing = "length of one timing (at least one call)"
    cli.add_argument("--target-seconds", type=float, default=0.3, help=timing)
    hint = "weight scales of the int8 Linear layers (per-tensor: torch's)"
    cli.add_argument("--int8-scheme", choices=("per-tensor", "per-channel"), default="per-tensor", help=hint)
    args = cli.parse_args()
    if args.smoke:  # MiniLM, batch 1 and 2, length 16, 1 thread
        args.backbones, args.batches, args.lengths, args.rounds = ["minilm"], [1, 2], [16], 2
        args.target_seconds, args.threads = 0.01, 1
    if not {"bare", "spartan"} <= set(args.contenders):
        cli.error("bare (the reference of every ratio) and spartan (the subject) must be contenders")
    report: dict[str, Any] = {"command": harness.command_line("bench_speed.py", ".venv-peers/bin/python")}
    engine = torch.backends.quantized.engine
    report["environment"] = harness.environment(threads=args.threads, quantized_engine=engine)
    settings = ["backbones", "contenders", "batches", "lengths", "rounds", "target_seconds", "int8_scheme"]
    report["settings"] = {key: getattr(args, key) for key in [*settings, "smoke"]}
    report["profiles"] = profiles(args)
    report.update(missing={}, quantization={}, flop_shares={}, cells=[])
    for backbone in args.backbones:
        run_backbone(backbone, report, args)
    report["summary"] = summarise(report["cells"])
    harness.finish(args.out, args.name, report, render, plot, smoke=args.smoke)


if __name__ == "__main__":
    main()
