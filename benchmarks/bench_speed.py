"""Inference speed of SPARTAN against the bare backbone, bottleneck adapters and LoRA, side by side.

Runs in the peers' environment (`make peers-env`; the contenders come from benchmarks/peers.py):

  bare      the backbone alone (mean-pooled): the physical limit of anything that shares it
  spartan   this project's encoder with a fresh default memory (E=16, C=3, k=8, task LayerNorms on)
  pfeiffer  AdapterHub `adapters` seq_bn, reduction 16     (no MPNet support: reported missing)
  houlsby   AdapterHub `adapters` double_seq_bn, reduction 16
  lora      PEFT LoRA r=8 on query and value, NOT merged (a multi-task server cannot merge)

Every contender is its own model on a fresh backbone, in eval mode, under torch.inference_mode(), fed
the identical encoding: real text (movie reviews) of exactly `length` tokens, no padding. Timing does not
depend on trained values, so the per-task modules are freshly initialised.

Per cell (backbone, profile, batch, length): a warm-up call per contender, then `--rounds` rounds; in
each round every contender runs `reps` forwards (chosen in the warm-up so that one timing lasts about
`--target-seconds`, at least one forward) in a rotated order.
Throughput = batch * reps / seconds. Per contender: median [min, max] over rounds. Ratios are taken
within a round (machine drift cancels) and summarised as median [min, max] over rounds.

Profiles:
  server     --threads torch threads (default 2), float32
  edge       1 torch thread, float32
  edge-int8  1 torch thread, the BACKBONE's Linear layers int8 (torch dynamic quantisation, per-tensor
             weight scales as `quantize_dynamic(model, {nn.Linear})` does; --int8-scheme per-channel
             for per-row scales); per-task modules (SPARTAN's memory and head, adapter bottlenecks,
             LoRA A/B) stay float32. `adapters` wraps every backbone Linear in a LoRALinear; with
             bottleneck adapters only these hold no LoRA and are swapped for quantised plain Linears.

Plus the accuracy change of int8: the shipped memories (memories/*.safetensors) scored on their test
splits with the float32 and with the int8 backbone.

    .venv-peers/bin/python benchmarks/bench_speed.py      # full run (~15 min on 2 quiet cores, estimated)
    .venv-peers/bin/python benchmarks/bench_speed.py --smoke --out /tmp/speed   # seconds; the tests run it
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.settings import Settings
from benchmarks import harness
from benchmarks.peers import Built, MethodUnavailable, TaskModel, build

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
CONTENDERS = ("bare", "spartan", "pfeiffer", "houlsby", "lora")
ADAPTERS = ("pfeiffer", "houlsby")
PROFILES = ("server", "edge", "edge-int8")
GOAL_VS_BARE = 0.97
GOAL_VS_ADAPTERS = 1.0
CLOSE_COSINE = 0.95  # int8 pooled output vs float32: below this the int8 model is not a faithful copy
# shipped memory -> the named dataset it was trained on (docs/MEMORIES.md)
SHIPPED = {"sentiment": "movie", "banking77": "banking77", "bbc-news": "bbc"}
ACCURACY_BACKBONE = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Profile:
    name: str
    threads: int
    int8: bool

    def describe(self) -> str:
        return f"{self.threads} torch thread{'s' if self.threads > 1 else ''}, " + (
            "backbone Linear layers int8 (dynamic quantisation)" if self.int8 else "float32"
        )


# ---------------------------------------------------------------------------------------------------
# inputs


def source_texts(cache_dir: Path) -> list[str]:
    """Real sentences to cut inputs from (the movie-review test split, in file order)."""
    from app.training.datasets import load_named

    return [ex.text for ex in load_named("movie", cache_dir).test]


def fixed_length_encoding(
    built: Built, texts: Sequence[str], batch: int, length: int
) -> dict[str, torch.Tensor]:
    """`batch` different rows of real text, each exactly `length` tokens (no padding)."""
    rows = []
    for row in range(batch):
        parts: list[str] = []
        index = row * 17  # different rows start at different reviews
        while len(" ".join(parts).split()) < length:
            parts.append(texts[index % len(texts)])
            index += 1
        rows.append(" ".join(parts))
    encoding = built.tokenize(rows, None, length)
    mask = encoding["attention_mask"]
    if tuple(mask.shape) != (batch, length) or not bool(mask.all()):
        raise RuntimeError(f"could not build {batch} x {length} unpadded tokens (got {tuple(mask.shape)})")
    return encoding


# ---------------------------------------------------------------------------------------------------
# contenders and int8


def build_contenders(
    backbone: str, cache_dir: Path, contenders: Sequence[str]
) -> tuple[dict[str, Built], dict[str, str]]:
    built: dict[str, Built] = {}
    missing: dict[str, str] = {}
    for name in contenders:
        try:
            one = build(name, backbone, cache_dir, num_outputs=2)
        except MethodUnavailable as err:
            missing[name] = str(err)
            continue
        one.model.eval()
        one.model.requires_grad_(False)
        built[name] = one
    return built, missing


def linear_names(model: nn.Module) -> list[str]:
    """Names of the plain nn.Linear modules of an untouched backbone (the ones int8 applies to)."""
    return [name for name, module in model.named_modules() if type(module) is nn.Linear]


def _is_empty_adapters_lora(module: nn.Module) -> bool:
    """`adapters` wraps every attention/FFN Linear in a LoRALinear; with bottleneck adapters only it
    holds no LoRA weights and computes exactly the plain Linear."""
    return (
        isinstance(module, nn.Linear)
        and type(module).__module__.startswith("adapters.")
        and len(getattr(module, "loras", {"?": None})) == 0
        and not getattr(module, "fan_in_fan_out", False)
    )


def quantize_backbone(root: nn.Module, names: Sequence[str], scheme: str = "per-tensor") -> dict[str, Any]:
    """int8 dynamic quantisation of the backbone Linear layers `names` (found in `root`, the backbone
    model inside a contender), leaving every per-task module in float32.

    - a plain nn.Linear: quantised;
    - PEFT's LoRA wrapper (has `base_layer`): the base_layer is quantised, lora_A/lora_B stay float32;
    - `adapters`' LoRALinear with no LoRA in it: replaced by a plain Linear with the same weights, then
      quantised (its per-call adapter dispatch goes away with it);
    - anything else: skipped and listed.

    `scheme` per-tensor is torch's default dynamic qconfig (what `quantize_dynamic(model, {nn.Linear})`
    does); per-channel quantises each output row's weights with its own scale.
    """
    from torch.ao.nn.quantized import dynamic as nnqd
    from torch.ao.quantization import default_dynamic_qconfig, per_channel_dynamic_qconfig, quantize_dynamic

    qconfig = {"per-tensor": default_dynamic_qconfig, "per-channel": per_channel_dynamic_qconfig}[scheme]

    targets: list[str] = []
    how: dict[str, int] = {}
    skipped: dict[str, str] = {}
    for name in names:
        module = root.get_submodule(name)
        base = getattr(module, "base_layer", None)
        if type(module) is nn.Linear:
            targets.append(name)
            kind = "plain Linear"
        elif type(base) is nn.Linear:
            targets.append(f"{name}.base_layer")
            kind = "PEFT base_layer (LoRA A/B stay float32)"
        elif _is_empty_adapters_lora(module):
            assert isinstance(module, nn.Linear)
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight = module.weight
            plain.bias = module.bias
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, plain)
            targets.append(name)
            kind = "adapters LoRALinear without LoRA -> plain Linear"
        else:
            skipped[name] = type(module).__name__
            continue
        how[kind] = how.get(kind, 0) + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        quantize_dynamic(root, qconfig_spec=dict.fromkeys(targets, qconfig), dtype=torch.qint8, inplace=True)
    quantized = sum(isinstance(m, nnqd.Linear) for m in root.modules())
    return {
        "backbone_linears": len(names),
        "scheme": scheme,
        "quantized": quantized,
        "how": how,
        "skipped": skipped,
        "backbone_float_linears_left": sum(type(m) is nn.Linear for m in root.modules()),
    }


def pooled_output(model: TaskModel, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
    """The pooled final hidden state the head sees (the bare model returns it directly)."""
    head = getattr(model, "memory", None)
    head = head.head if head is not None else getattr(model, "head", None)
    if head is None:
        return model(encoding)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    try:
        model(encoding)
    finally:
        handle.remove()
    return captured[0]


# ---------------------------------------------------------------------------------------------------
# timing


def seconds(fn: Callable[[], object], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return time.perf_counter() - start


spread = harness.spread


def ratio_series(per_round: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per-round throughput ratios; within a round the contenders shared the machine's state."""
    rounds = len(per_round["bare"])
    adapters = [a for a in ADAPTERS if a in per_round]
    best_adapter = [max(per_round[a][r] for a in adapters) for r in range(rounds)] if adapters else None
    pairs: list[tuple[str, list[float], list[float]]] = [
        (f"{name}/bare", values, per_round["bare"]) for name, values in per_round.items() if name != "bare"
    ]
    if "spartan" in per_round:
        pairs += [
            (f"spartan/{p}", per_round["spartan"], per_round[p])
            for p in (*adapters, "lora")
            if p in per_round
        ]
        if best_adapter is not None:
            pairs.append(("spartan/best_adapter", per_round["spartan"], best_adapter))
    if best_adapter is not None:
        pairs.append(("bare/best_adapter", per_round["bare"], best_adapter))
    return {key: [a / b for a, b in zip(top, bottom, strict=True)] for key, top, bottom in pairs}


def calibrate(calls: dict[str, Callable[[], object]], target_s: float) -> int:
    """Warm up every contender (the first call at a new shape allocates and picks kernels) and choose
    the forwards per timing so one timing lasts about `target_s` (the same count for every contender)."""
    times = {name: seconds(call, 1) for name, call in calls.items()}
    for name, took in times.items():
        if took < target_s:  # cheap enough: time a second, warm call instead of the first
            times[name] = seconds(calls[name], 1)
    return max(1, round(target_s / statistics.median(times.values())))


def run_cell(
    models: dict[str, TaskModel], encoding: dict[str, torch.Tensor], batch: int, rounds: int, target_s: float
) -> tuple[int, dict[str, list[float]]]:
    names = list(models)
    calls = {name: (lambda m=model: m(encoding)) for name, model in models.items()}
    per_round: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            reps = calibrate(calls, target_s)
            for number in range(rounds):
                shift = number % len(names)
                for name in names[shift:] + names[:shift]:
                    per_round[name].append(batch * reps / seconds(calls[name], reps))
    finally:
        gc.enable()
    return reps, per_round


def run_profile(
    backbone: str,
    profile: Profile,
    built: dict[str, Built],
    inputs: dict[tuple[int, int], dict[str, torch.Tensor]],
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    torch.set_num_threads(profile.threads)
    models = {name: one.model for name, one in built.items()}
    cells = []
    for batch in args.batches:
        for length in args.lengths:
            started = time.perf_counter()
            reps, per_round = run_cell(
                models, inputs[(batch, length)], batch, args.rounds, args.target_seconds
            )
            ratios = ratio_series(per_round)
            cell: dict[str, Any] = {
                "backbone": backbone,
                "profile": profile.name,
                "threads": profile.threads,
                "int8": profile.int8,
                "batch": batch,
                "length": length,
                "reps": reps,
                "rounds": args.rounds,
                "seconds": round(time.perf_counter() - started, 2),
                "examples_per_s": {
                    name: {"per_round": values, **spread(values)} for name, values in per_round.items()
                },
                "ratios": {key: {"per_round": values, **spread(values)} for key, values in ratios.items()},
            }
            cell["goals"] = {
                "spartan_vs_bare": cell["ratios"]["spartan/bare"]["median"] >= GOAL_VS_BARE,
                "spartan_vs_adapters": (
                    cell["ratios"]["spartan/best_adapter"]["median"] >= GOAL_VS_ADAPTERS
                    if "spartan/best_adapter" in cell["ratios"]
                    else None
                ),
            }
            cells.append(cell)
            medians = " ".join(f"{n}={v['median']:.1f}" for n, v in cell["examples_per_s"].items())
            print(
                f"[{backbone} {profile.name} b{batch} L{length} x{reps}] ex/s {medians}; spartan/bare "
                f"{cell['ratios']['spartan/bare']['median']:.3f} ({cell['seconds']} s)",
                flush=True,
            )
    return cells


def quantize_contenders(
    built: dict[str, Built], probe: dict[str, torch.Tensor], scheme: str
) -> dict[str, Any]:
    """int8 on every contender's backbone; the cosine of its pooled output against float32."""
    from torch.ao.nn.quantized import dynamic as nnqd

    reference_names = linear_names(build_reference_model(built))
    report: dict[str, Any] = {}
    for name, one in built.items():
        with torch.inference_mode():
            before = pooled_output(one.model, probe).float()
        info = quantize_backbone(one.backbone.model, reference_names, scheme)
        with torch.inference_mode():
            after = pooled_output(one.model, probe).float()
        cosine = torch.nn.functional.cosine_similarity(before, after, dim=-1)
        # the whole task model: per-task Linear modules (head, bottlenecks, LoRA A/B) must stay float32
        info["model_quantized"] = sum(isinstance(m, nnqd.Linear) for m in one.model.modules())
        info["model_float_linears"] = sum(type(m) is nn.Linear for m in one.model.modules())
        info["pooled_cosine_min"] = float(cosine.min())
        info["pooled_cosine_mean"] = float(cosine.mean())
        info["int8"] = info["quantized"] > 0
        info["output_close"] = info["pooled_cosine_min"] >= CLOSE_COSINE
        report[name] = info
        print(
            f"  int8 {name}: {info['quantized']}/{info['backbone_linears']} backbone Linear quantised "
            f"{info['how']}, skipped {len(info['skipped'])}, "
            f"pooled cosine min {info['pooled_cosine_min']:.4f}",
            flush=True,
        )
    return report


def build_reference_model(built: dict[str, Built]) -> nn.Module:
    """The untouched backbone model (bare's), whose Linear names the other contenders share."""
    if "bare" in built:
        return built["bare"].backbone.model
    raise RuntimeError("the bare contender is needed as the reference for int8 (it is always built)")


# ---------------------------------------------------------------------------------------------------
# int8 accuracy of the shipped memories


INT8_SCHEMES = ("per-tensor", "per-channel")


def int8_accuracy(cache_dir: Path, cap: int | None, threads: int, scheme: str) -> list[dict[str, Any]]:
    """Every shipped memory on its test split (or `cap` examples of it): float32 backbone, then int8 with
    both weight schemes (`scheme`, the speed profile's, is the row's "int8"). A fresh backbone per
    scheme; each memory is loaded against the float32 identity (int8 changes the weights in place)."""
    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder
    from app.spartan.memfile import load_memory_file
    from app.training.datasets import load_named
    from app.training.metrics import compute_metrics
    from app.training.trainer import predict_outputs

    torch.set_num_threads(threads)
    data = {task: load_named(dataset, cache_dir) for task, dataset in SHIPPED.items()}
    examples = {
        task: (
            random.Random(f"{task}:int8").sample(list(d.test), cap)
            if cap is not None and len(d.test) > cap
            else list(d.test)
        )
        for task, d in data.items()
    }
    outputs: dict[str, dict[str, torch.Tensor]] = {task: {} for task in SHIPPED}
    seconds_by_variant: dict[str, float] = {}
    quantized: dict[str, dict[str, Any]] = {}
    memories: dict[str, Any] = {}
    for number, int8_scheme in enumerate(INT8_SCHEMES):
        encoder = SpartanEncoder(load_backbone(ACCURACY_BACKBONE, cache_dir))
        memories = {
            task: load_memory_file(ROOT / "memories" / f"{task}.safetensors", encoder.identity())
            for task in SHIPPED
        }
        variants = ["fp32", int8_scheme] if number == 0 else [int8_scheme]
        for variant in variants:
            if variant != "fp32":
                quantized[variant] = quantize_backbone(
                    encoder.backbone.model, linear_names(encoder.backbone.model), variant
                )
                print(
                    f"  int8 {variant} backbone: {quantized[variant]['quantized']} Linear quantised",
                    flush=True,
                )
            started = time.perf_counter()
            for task, memory in memories.items():
                outputs[task][variant] = predict_outputs(encoder, memory, examples[task])
            seconds_by_variant[variant] = round(time.perf_counter() - started, 1)
        encoder.close()
    rows = []
    for task, memory in memories.items():
        d, chosen = data[task], examples[task]
        truth = [d.label_index(ex) for ex in chosen]
        predicted = {variant: out.argmax(-1) for variant, out in outputs[task].items()}
        scores = {
            variant: compute_metrics(memory.spec.task_type, truth, labels.tolist())
            for variant, labels in predicted.items()
        }
        schemes = {
            variant: {
                "metrics": scores[variant],
                "delta_accuracy": scores[variant]["accuracy"] - scores["fp32"]["accuracy"],
                "prediction_agreement": float((predicted[variant] == predicted["fp32"]).float().mean()),
                "backbone_linears_quantized": quantized[variant]["quantized"],
                "backbone_linears": quantized[variant]["backbone_linears"],
            }
            for variant in INT8_SCHEMES
        }
        recorded_path = ROOT / "docs" / "memories" / f"{task}.json"
        recorded = json.loads(recorded_path.read_text())["test"] if recorded_path.exists() else {}
        row = {
            "memory": f"memories/{task}.safetensors",
            "dataset": SHIPPED[task],
            "examples": len(chosen),
            "test_split": len(d.test),
            "fp32": scores["fp32"],
            "int8_scheme": scheme,
            "int8": scores[scheme],
            "delta_accuracy": schemes[scheme]["delta_accuracy"],
            "prediction_agreement": schemes[scheme]["prediction_agreement"],
            "schemes": schemes,
            "recorded_accuracy": recorded.get("accuracy"),
            "seconds": seconds_by_variant,
        }
        rows.append(row)
        deltas = ", ".join(
            f"{v} {schemes[v]['metrics']['accuracy']:.4f} ({schemes[v]['delta_accuracy']:+.4f}, "
            f"agreement {schemes[v]['prediction_agreement']:.3f})"
            for v in INT8_SCHEMES
        )
        print(
            f"  {task}: fp32 {scores['fp32']['accuracy']:.4f}; int8 {deltas}; {len(chosen)} examples",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------------
# report


def environment(args: argparse.Namespace) -> dict[str, Any]:
    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cpu = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                    if line.startswith("model name")), "")  # fmt: skip
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "adapters": version("adapters"),
        "peft": version("peft"),
        "quantized_engine": torch.backends.quantized.engine,
        "server_threads": args.threads,
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def fmt_speed(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    return f"{entry['median']:.1f} [{entry['min']:.1f}, {entry['max']:.1f}]"


def fmt_ratio(entry: dict[str, Any] | None, goal: float | None = None) -> str:
    if entry is None:
        return "—"
    mark = "" if goal is None else (" ✓" if entry["median"] >= goal else " ✗")
    return f"{entry['median']:.3f} [{entry['min']:.3f}, {entry['max']:.3f}]{mark}"


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
    for profile in PROFILES:
        for backbone in dict.fromkeys(c["backbone"] for c in cells):
            mine = [c for c in cells if c["profile"] == profile and c["backbone"] == backbone]
            if not mine:
                continue
            vs_bare = [c["ratios"]["spartan/bare"]["median"] for c in mine]
            vs_adapters = [c["goals"]["spartan_vs_adapters"] for c in mine]
            ceiling = [
                c["ratios"]["bare/best_adapter"]["median"] for c in mine if "bare/best_adapter" in c["ratios"]
            ]
            rows.append({
                "profile": profile,
                "backbone": backbone,
                "cells": len(mine),
                "spartan_vs_bare_met": sum(c["goals"]["spartan_vs_bare"] for c in mine),
                "spartan_vs_bare_worst": min(vs_bare),
                "spartan_vs_bare_median": statistics.median(vs_bare),
                "spartan_vs_adapters_met": (
                    None if any(v is None for v in vs_adapters) else sum(bool(v) for v in vs_adapters)
                ),
                "bare_vs_best_adapter_max": max(ceiling) if ceiling else None,
            })  # fmt: skip
    return rows


def render(report: dict[str, Any]) -> str:
    env = report["environment"]
    settings = report["settings"]
    lines = [
        f"# Inference speed: SPARTAN vs bare backbone, adapters and LoRA ({report['date']})",
        "",
        f"Command: `{report['command']}`. Machine: {env['cpu'] or env['machine']}, {env['cpu_count']} CPUs, "
        f"{env['platform']}; torch {env['torch']}, transformers {env['transformers']}, adapters "
        f"{env['adapters']}, PEFT {env['peft']}, quantized engine {env['quantized_engine']}. Load average "
        f"at start {env['load_average_start']}, at end {env.get('load_average_end')} (a busy machine "
        "widens the spreads; the within-round ratios are the robust numbers). Total "
        f"{report['seconds']:.0f} s.",
        "",
        "Contenders (each its own model on a fresh backbone, eval mode, `torch.inference_mode()`, the "
        "identical input): `bare` = the backbone + mean pooling; `spartan` = the project's encoder with a "
        "fresh default memory (E = 16, C = 3, k = 8, task LayerNorms on) and head; `pfeiffer` / `houlsby` = "
        "AdapterHub `adapters` seq_bn / double_seq_bn (reduction 16) + head; `lora` = PEFT LoRA r = 8 on "
        "query and value, unmerged, + head. Inputs: movie-review text, exactly `length` tokens per row, "
        "no padding.",
        "",
        f"Method: per cell a warm-up call per contender, then {settings['rounds']} rounds; in a round every "
        f"contender runs `reps` forwards in a rotated order (`reps` chosen in the warm-up so one timing "
        f"lasts about {settings['target_seconds']} s, at least one forward; the same for every contender). "
        "Examples/s: median [min, max] over rounds. Ratios are computed within each round (machine "
        "drift cancels) and shown as median [min, max]. `best adapter` = the faster of pfeiffer and "
        f"houlsby in that round. Goals: SPARTAN/bare ≥ {GOAL_VS_BARE}, SPARTAN/best adapter ≥ "
        f"{GOAL_VS_ADAPTERS} (✓/✗ on the median). — = not available (`adapters` has no MPNet support).",
        "",
        "## Summary",
        "",
        "| profile | backbone | cells | SPARTAN/bare ≥ 0.97 | SPARTAN/bare median (worst) | "
        "SPARTAN ≥ best adapter | bare/best adapter (max) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        adapters = (
            "—" if s["spartan_vs_adapters_met"] is None else f"{s['spartan_vs_adapters_met']}/{s['cells']}"
        )
        ceiling = "—" if s["bare_vs_best_adapter_max"] is None else f"{s['bare_vs_best_adapter_max']:.3f}"
        lines.append(
            f"| {s['profile']} | {s['backbone']} | {s['cells']} | {s['spartan_vs_bare_met']}/{s['cells']} | "
            f"{s['spartan_vs_bare_median']:.3f} ({s['spartan_vs_bare_worst']:.3f}) | {adapters} | {ceiling} |"
        )
    contenders = report["settings"]["contenders"]
    for profile in report["profiles"]:
        cells = [c for c in report["cells"] if c["profile"] == profile["name"]]
        if not cells:
            continue
        lines += [
            "",
            f"## Profile `{profile['name']}`: {profile['description']}",
            "",
            "| backbone | batch | length | reps | "
            + " | ".join(f"{c} ex/s" for c in contenders)
            + " | SPARTAN/bare | SPARTAN/best adapter | SPARTAN/lora |",
            "|---|---|---|---|" + "---|" * (len(contenders) + 3),
        ]
        for c in cells:
            speeds = " | ".join(fmt_speed(c["examples_per_s"].get(name)) for name in contenders)
            r = c["ratios"]
            lines.append(
                f"| {c['backbone']} | {c['batch']} | {c['length']} | {c['reps']} | {speeds} | "
                f"{fmt_ratio(r.get('spartan/bare'), GOAL_VS_BARE)} | "
                f"{fmt_ratio(r.get('spartan/best_adapter'), GOAL_VS_ADAPTERS)} | "
                f"{fmt_ratio(r.get('spartan/lora'), 1.0)} |"
            )
        if profile["int8"]:
            lines += [
                "",
                f"Which contenders ran int8 ({settings['int8_scheme']} weight scales; backbone Linear "
                "layers quantised / backbone Linear layers; cosine of the pooled output int8 vs float32 on "
                "a probe batch of 4 rows). For `pfeiffer`/`houlsby` the LoRALinear wrappers that "
                "`adapters` puts around the backbone's Linear layers (empty with bottleneck adapters) are "
                "replaced by the quantised Linear, so their per-call dispatch cost is gone in this profile "
                "(it stays in the float32 profiles):",
                "",
                "| backbone | contender | quantised | how | skipped | pooled cosine min |",
                "|---|---|---|---|---|---|",
            ]
            for backbone, per in report["quantization"].items():
                for name, q in per.items():
                    how = "; ".join(f"{k}: {v}" for k, v in q["how"].items())
                    lines.append(
                        f"| {backbone} | {name} | {q['quantized']}/{q['backbone_linears']} | {how} | "
                        f"{len(q['skipped'])} | {q['pooled_cosine_min']:.4f} |"
                    )
            far = [
                f"{bb} (down to {min(q['pooled_cosine_min'] for q in per.values()):.2f})"
                for bb, per in report["quantization"].items()
                if not all(q["output_close"] for q in per.values())
            ]
            if far:
                lines += [
                    "",
                    f"**Warning:** the int8 pooled output is far from float32's (cosine below "
                    f"{CLOSE_COSINE}) on {', '.join(far)}: those int8 timings describe a model whose "
                    "outputs changed markedly (accuracy is measured for the shipped MiniLM memories only). "
                    "Dynamic quantisation gives each Linear's input activations one range per tensor; in a "
                    "side probe (not part of this run) most of the error came from the FFN output "
                    "projections, whose GELU inputs carry outlier features.",
                ]
    speedups = int8_speedups(report["cells"])
    if speedups:
        lines += [
            "",
            "## int8 speed-up at 1 thread",
            "",
            "edge-int8 ex/s over edge ex/s (medians of two separate runs, so machine drift does not cancel):",
            "",
            "| backbone | batch | length | " + " | ".join(contenders) + " |",
            "|---|---|---|" + "---|" * len(contenders),
        ]
        for key, values in speedups.items():
            row = " | ".join(f"{values[c]:.2f}x" if c in values else "—" for c in contenders)
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {row} |")
    if report.get("int8_accuracy"):
        lines += [
            "",
            "## int8 accuracy",
            "",
            f"The shipped memories ({ACCURACY_BACKBONE}) on their test splits, loaded against the float32 "
            "backbone, then scored with the float32 backbone and with its Linear layers int8 (dynamic "
            "quantisation; per-tensor weight scales = torch's default qconfig, per-channel = one scale per "
            f"output row); the memories and heads stay float32. The speed profile used "
            f"{settings['int8_scheme']}. Agreement = share of predictions identical to float32's.",
            "",
            "| memory | dataset | examples | fp32 accuracy | "
            + " | ".join(f"int8 {v} accuracy (Δ) | agreement" for v in INT8_SCHEMES)
            + " | fp32 macro-F1 | recorded (docs/memories) |",
            "|---|---|---|---|" + "---|---|" * len(INT8_SCHEMES) + "---|---|",
        ]
        for a in report["int8_accuracy"]:
            shown = f"{a['examples']}" + (
                "" if a["examples"] == a["test_split"] else f" of {a['test_split']}"
            )
            recorded = "—" if a["recorded_accuracy"] is None else f"{a['recorded_accuracy']:.4f}"
            schemes = " | ".join(
                f"{a['schemes'][v]['metrics']['accuracy']:.4f} ({a['schemes'][v]['delta_accuracy']:+.4f}) | "
                f"{a['schemes'][v]['prediction_agreement']:.4f}"
                for v in INT8_SCHEMES
            )
            lines.append(
                f"| `{a['memory']}` | {a['dataset']} | {shown} | {a['fp32']['accuracy']:.4f} | {schemes} | "
                f"{a['fp32']['macro_f1']:.4f} | {recorded} |"
            )
    lines += ["", *paper_gap(report)]
    return "\n".join(lines) + "\n"


def int8_speedups(cells: list[dict[str, Any]]) -> dict[tuple[str, int, int], dict[str, float]]:
    by_key = {(c["backbone"], c["batch"], c["length"], c["profile"]): c for c in cells}
    result = {}
    for (backbone, batch, length, profile), cell in by_key.items():
        if profile != "edge-int8" or (backbone, batch, length, "edge") not in by_key:
            continue
        fp32 = by_key[(backbone, batch, length, "edge")]["examples_per_s"]
        result[(backbone, batch, length)] = {
            name: entry["median"] / fp32[name]["median"]
            for name, entry in cell["examples_per_s"].items()
            if name in fp32
        }
    return result


PAPER_CLAIM = 1.9  # "inference throughput more than 90% higher than adapters" (abstract, Raspberry Pi 4)


def paper_gap(report: dict[str, Any]) -> list[str]:
    cells = report["cells"]
    lines = [
        f"## The gap to the paper's {PAPER_CLAIM}x",
        "",
        "The paper's abstract claims inference throughput more than 90% higher than adapters on a "
        "Raspberry Pi 4; its tables could not be found, so its batch, length, backbone and adapter code are "
        "unknown. Here SPARTAN and the adapters share one backbone, and the backbone is nearly all of the "
        "arithmetic. Extra FLOPs per token per layer, as a share of the layer's own FLOPs (length 128):",
        "",
    ]
    for backbone, per in report.get("flop_shares", {}).items():
        lines.append(f"- {backbone}: " + ", ".join(f"{n} +{100 * share:.1f}%" for n, share in per.items()))
    lines += [
        "",
        "Measured (median per-round ratios; range over the cells of each profile):",
        "",
        "| profile | backbone | SPARTAN/bare | SPARTAN/best adapter | bare/best adapter (the ceiling) |",
        "|---|---|---|---|---|",
    ]
    ceilings: list[float] = []
    for profile in PROFILES:
        for backbone in dict.fromkeys(c["backbone"] for c in cells):
            mine = [c for c in cells if c["profile"] == profile and c["backbone"] == backbone]
            if not mine:
                continue

            def span(key: str, mine: list[dict[str, Any]] = mine) -> str:
                values = [c["ratios"][key]["median"] for c in mine if key in c["ratios"]]
                return f"{min(values):.3f} to {max(values):.3f}" if values else "—"

            ceilings += [
                c["ratios"]["bare/best_adapter"]["median"] for c in mine if "bare/best_adapter" in c["ratios"]
            ]
            lines.append(
                f"| {profile} | {backbone} | {span('spartan/bare')} | {span('spartan/best_adapter')} | "
                f"{span('bare/best_adapter')} |"
            )
    lines.append("")
    if ceilings and max(ceilings) < PAPER_CLAIM:
        verdict = (
            "SPARTAN does all the work of `bare` plus its memory, so bare/best adapter bounds what any "
            "method that runs this backbone in full can gain over the adapters (up to timing noise); here "
            f"that bound is at most {max(ceilings):.3f}, below {PAPER_CLAIM}x in every cell."
        )
    elif ceilings:
        verdict = (
            f"In at least one cell the adapters run slower than 1/{PAPER_CLAIM} of `bare` (bare/best adapter "
            f"up to {max(ceilings):.3f}), so a {PAPER_CLAIM}x over adapters is possible there in principle."
        )
    else:
        verdict = "No adapter ran here (the `adapters` library does not support this backbone)."
    lines.append(
        verdict + " The differences between the methods are per-call overheads, not FLOPs: extra modules, "
        "Python dispatch, small matrix products, SPARTAN's top-k/gather/softmax per layer, and "
        "AdapterHub's LoRALinear wrapper around every attention and FFN Linear, whose dispatch runs on "
        "every call even without LoRA. They weigh most at batch 1 on short inputs and on a slow core, "
        "which is where a large ratio over adapters could come from (a Raspberry Pi at batch 1, an older "
        "adapter implementation), or from a different comparison (memories in fewer layers, a smaller "
        "backbone). We cannot reproduce the 1.9x and do not claim it."
    )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    plt = harness.pyplot()

    profiles = [
        p["name"] for p in report["profiles"] if any(c["profile"] == p["name"] for c in report["cells"])
    ]
    peers = [c for c in report["settings"]["contenders"] if c != "bare"]
    fig, axes = plt.subplots(len(profiles), 1, figsize=(12, 3.6 * len(profiles)), squeeze=False)
    for ax, profile in zip(axes[:, 0], profiles, strict=True):
        cells = [c for c in report["cells"] if c["profile"] == profile]
        labels = [f"{c['backbone']}\nb{c['batch']} L{c['length']}" for c in cells]
        width = 0.8 / len(peers)
        for number, name in enumerate(peers):
            xs, ys, low, high = [], [], [], []
            for i, c in enumerate(cells):
                entry = c["ratios"].get(f"{name}/bare")
                if entry is None:
                    continue
                xs.append(i + (number - (len(peers) - 1) / 2) * width)
                ys.append(entry["median"])
                low.append(entry["median"] - entry["min"])
                high.append(entry["max"] - entry["median"])
            ax.bar(xs, ys, width, yerr=[low, high], capsize=2, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(GOAL_VS_BARE, color="red", linestyle="--", linewidth=0.8, label=f"goal {GOAL_VS_BARE}")
        ax.set_xticks(range(len(cells)), labels, fontsize=7)
        ax.set_ylabel("ex/s relative to bare")
        ax.set_title(f"profile {profile}: median per-round ratio to the bare backbone [min, max]")
        tops = [c["ratios"][key]["max"] for c in cells for key in c["ratios"] if key.endswith("/bare")]
        lows = [c["ratios"][key]["min"] for c in cells for key in c["ratios"] if key.endswith("/bare")]
        ax.set_ylim(max(0.0, min([*lows, GOAL_VS_BARE]) - 0.05), max([*tops, 1.0]) + 0.05)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    harness.save_figure(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=["minilm", "mpnet"])
    parser.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    parser.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--lengths", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--target-seconds", type=float, default=0.3, help="length of one timing (reps forwards; at least one)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server profile")
    parser.add_argument("--accuracy-cap", type=int, default=None, help="test examples per memory (all)")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument(
        "--int8-scheme",
        choices=INT8_SCHEMES,
        default="per-tensor",
        help="weight scales of the int8 Linear layers (per-tensor: torch's default dynamic qconfig)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--smoke", action="store_true", help="MiniLM, batch 1 and 2, length 16, 1 thread")
    args = parser.parse_args()
    if args.smoke:
        args.backbones, args.batches, args.lengths = ["minilm"], [1, 2], [16]
        args.rounds, args.target_seconds, args.threads, args.accuracy_cap = 2, 0.01, 1, 16
    if not {"bare", "spartan"} <= set(args.contenders):
        parser.error("bare (the reference of every ratio) and spartan (the subject) must be contenders")
    cache_dir = Settings().cache_dir
    started = time.perf_counter()
    report: dict[str, Any] = {
        "date": date.today().isoformat(),
        "command": " ".join([".venv-peers/bin/python", "benchmarks/bench_speed.py", *sys.argv[1:]]),
        "environment": environment(args),
        "settings": {
            "backbones": args.backbones,
            "contenders": args.contenders,
            "batches": args.batches,
            "lengths": args.lengths,
            "rounds": args.rounds,
            "target_seconds": args.target_seconds,
            "spartan": {"num_parents": 16, "num_children": 3, "top_k": 8, "layernorms": True},
            "accuracy_cap": args.accuracy_cap,
            "int8_scheme": args.int8_scheme,
            "smoke": args.smoke,
        },
        "profiles": [],
        "missing": {},
        "quantization": {},
        "flop_shares": {},
        "cells": [],
    }
    profiles = [
        Profile("server", args.threads, False),
        Profile("edge", 1, False),
        Profile("edge-int8", 1, True),
    ]
    profiles = [p for p in profiles if p.name in args.profiles]
    report["profiles"] = [{"name": p.name, "threads": p.threads, "int8": p.int8, "description": p.describe()}
                          for p in profiles]  # fmt: skip
    texts = source_texts(cache_dir)
    for backbone in args.backbones:
        float_profiles = [p for p in profiles if not p.int8]
        int8_profiles = [p for p in profiles if p.int8]
        for group in (float_profiles, int8_profiles):
            if not group:
                continue
            print(f"building {backbone} contenders ({', '.join(p.name for p in group)})", flush=True)
            built, missing = build_contenders(backbone, cache_dir, args.contenders)
            report["missing"][backbone] = missing
            reference = built["bare"]
            config = reference.backbone.model.config
            report["flop_shares"][backbone] = flop_shares(config.hidden_size, config.intermediate_size, 128)
            inputs = {
                (b, n): fixed_length_encoding(reference, texts, b, n)
                for b in args.batches
                for n in args.lengths
            }
            if group is int8_profiles:
                torch.set_num_threads(group[0].threads)
                probe = fixed_length_encoding(reference, texts, 4, min(args.lengths))
                report["quantization"][backbone] = quantize_contenders(built, probe, args.int8_scheme)
            for profile in group:
                report["cells"] += run_profile(backbone, profile, built, inputs, args)
            del built, inputs, reference
            gc.collect()
    if not args.skip_accuracy and any(p.int8 for p in profiles):
        print("int8 accuracy of the shipped memories", flush=True)
        report["int8_accuracy"] = int8_accuracy(cache_dir, args.accuracy_cap, args.threads, args.int8_scheme)
    report["summary"] = summarise(report["cells"])
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    name = "speed_inference_smoke" if args.smoke else "speed_inference"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(render(report))
    plot(report, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.{{json,md,png}} in {report['seconds']} s", flush=True)


if __name__ == "__main__":
    main()
