"""The CPU engine: backbone runtimes side by side, what the memories cost on the chosen one, and the
accuracy the default precision keeps.

    python benchmarks/bench_engine.py speed       # every runtime, each in its own process (~10 min)
    python benchmarks/bench_engine.py accuracy    # the shipped memories, fp32 vs the default precision
    python benchmarks/bench_engine.py speed --smoke --out /tmp/x   # seconds; run by the tests

`speed` runs, per thread count (1, 2) and per cell (batch 1/8/32 x length 64/128), in one child
process per runtime:
* torch fp32 / bf16: transformers' own model (`eager`, no hooks), the project's encoder with no memory
  (`bare`), with one task (`spartan-1`), with 6 tasks mixed in one pass (`spartan-6`, batches >= 8),
  and the served path for those 6 tasks (`served-6`: padding, forward, probabilities as numbers);
* ONNX Runtime fp32 / dynamic int8 (per-channel) and OpenVINO fp32 / bf16, the bare backbone (they
  cannot run per-row memories after every layer; see docs/ENGINE.md), from the runtimes environment
  (`make runtimes-env`).
Contenders of one process alternate inside each round; ratios are per round. Each child also returns
its pooled output on a fixed probe batch; the parent reports its cosine to torch fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness

RUNTIMES_PYTHON = harness.ROOT / ".venv-runtimes" / "bin" / "python"
MEMORIES = harness.ROOT / "memories"
SENTENCE = "the film was a surprisingly moving portrait of grief and hope told with wit and restraint"
WORDS = SENTENCE.split(" ")
# (runtime, precision): which interpreter runs it
RUNTIMES = [
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("onnxruntime", "fp32"),
    ("onnxruntime", "int8"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
]
SMOKE_RUNTIMES = [("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "int8"), ("openvino", "bf16")]


def fixed_length_batch(tokenizer: Any, batch: int, length: int) -> dict[str, Any]:
    """`batch` different texts of exactly `length` tokens (no padding: the memories' worst case)."""
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)) for i in range(batch)]
    encoded = tokenizer(texts, truncation=True, max_length=length, padding="max_length", return_tensors="pt")
    return dict(encoded)


def texts_of_length(length: int, count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length - 2)) for i in range(count)]


# ------------------------------------------------------------------------------------------- torch


def torch_contenders(
    precision: str, batch: int, length: int, state: dict[str, Any]
) -> dict[str, Callable[[], object]]:
    import torch

    from app.engine.backbone import pool
    from app.engine.encoder import RowGroup
    from app.engine.runner import Row

    encoder, eager, runner, memories = state["encoder"], state["eager"], state["runner"], state["memories"]
    inputs = fixed_length_batch(encoder.backbone.tokenizer, batch, length)
    mask = inputs["attention_mask"]

    def run_eager() -> object:
        return pool(eager(**inputs).last_hidden_state.float(), mask, "mean")

    contenders: dict[str, Callable[[], object]] = {
        "eager": run_eager,
        "bare": lambda: encoder.forward(inputs, [RowGroup(None, torch.arange(batch))]),
        "spartan-1": lambda: encoder.forward(inputs, [RowGroup(memories[0], torch.arange(batch))]),
    }
    if batch >= 6:
        bounds = [round(i * batch / 6) for i in range(7)]
        groups = [RowGroup(memories[i], torch.arange(bounds[i], bounds[i + 1])) for i in range(6)]
        contenders["spartan-6"] = lambda: encoder.forward(inputs, groups)
        rows = [Row(memories[i % 6], text) for i, text in enumerate(texts_of_length(length, batch))]
        prepared = runner.prepare(rows)
        contenders["served-6"] = lambda: runner.run(prepared)
    return contenders


def torch_state(precision: str) -> dict[str, Any]:
    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder
    from app.engine.runner import EncoderRunner
    from app.settings import Settings
    from app.spartan.memfile import load_memory_file

    cache_dir = Settings().cache_dir
    encoder = SpartanEncoder(load_backbone("all-MiniLM-L6-v2", cache_dir, precision=precision))  # type: ignore[arg-type]
    eager = load_backbone("all-MiniLM-L6-v2", cache_dir, precision=precision).model  # type: ignore[arg-type]
    paths = sorted(MEMORIES.glob("*.safetensors"))
    # Six distinct memory objects (each shipped file loaded twice): six groups in a pass, as six tasks.
    memories = [load_memory_file(paths[i % len(paths)], encoder.identity()) for i in range(6)]
    return {"encoder": encoder, "eager": eager, "runner": EncoderRunner(encoder), "memories": memories}


def probe_torch(state: dict[str, Any]) -> list[list[float]]:
    import torch

    from app.engine.encoder import RowGroup

    encoder = state["encoder"]
    inputs = fixed_length_batch(encoder.backbone.tokenizer, 4, 64)
    with torch.inference_mode():
        return encoder.forward(inputs, [RowGroup(None, torch.arange(4))]).pooled.tolist()


# ------------------------------------------------------------------------------------ ONNX Runtime, OpenVINO


def export_onnx(folder: Path) -> tuple[Path, Any]:
    """The fp32 backbone as ONNX (dynamic batch and length), with its tokenizer."""
    import torch

    from app.engine.backbone import load_backbone
    from app.settings import Settings

    backbone = load_backbone("all-MiniLM-L6-v2", Settings().cache_dir)
    sample = fixed_length_batch(backbone.tokenizer, 2, 16)
    names = list(sample)
    path = folder / "backbone.onnx"

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone.model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    axes = {name: {0: "batch", 1: "length"} for name in names}
    torch.onnx.export(
        Hidden(), tuple(sample[n] for n in names), str(path), input_names=names, output_names=["hidden"],
        dynamic_axes={**axes, "hidden": {0: "batch", 1: "length"}}, opset_version=17, dynamo=False,
    )  # fmt: skip
    return path, backbone.tokenizer


def mean_pool(hidden: Any, mask: Any) -> Any:
    import numpy as np

    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def other_runtime(
    runtime: str, precision: str, threads: int, cells: list[tuple[int, int]], rounds: int
) -> Any:
    workdir = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    onnx_path, tokenizer = export_onnx(workdir)
    if runtime == "onnxruntime":
        infer = onnxruntime_session(onnx_path, precision, threads, workdir)
    else:
        infer = openvino_model(onnx_path, precision, threads)
    results = []
    for batch, length in cells:
        inputs = {k: v.numpy() for k, v in fixed_length_batch(tokenizer, batch, length).items()}
        per_round = harness.alternate(
            {"bare": lambda inputs=inputs: infer(inputs)}, rounds=rounds, items_per_call=batch
        )
        results.append({"batch": batch, "length": length, "bare": harness.spread(per_round["bare"])})
    probe = {k: v.numpy() for k, v in fixed_length_batch(tokenizer, 4, 64).items()}
    pooled = mean_pool(infer(probe), probe["attention_mask"])
    return {"cells": results, "probe": pooled.tolist()}


def onnxruntime_session(path: Path, precision: str, threads: int, workdir: Path) -> Callable[[Any], Any]:
    import onnxruntime as ort

    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = workdir / "backbone-int8.onnx"
        quantize_dynamic(str(path), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda inputs: session.run(None, {k: v for k, v in inputs.items() if k in names})[0]


def openvino_model(path: Path, precision: str, threads: int) -> Callable[[Any], Any]:
    import openvino as ov

    core = ov.Core()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    return lambda inputs: request.infer({k: v for k, v in inputs.items() if k in names})[0].copy()


# ------------------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)  # this child is its own process: its start
    cells = [tuple(map(int, cell.split("x"))) for cell in args.cells]
    if args.runtime != "torch":
        result = other_runtime(args.runtime, args.precision, args.threads, cells, args.rounds)  # type: ignore[arg-type]
        print(json.dumps(result))
        return
    state = torch_state(args.precision)
    results = []
    with torch.inference_mode():
        for batch, length in cells:
            per_round = harness.alternate(
                torch_contenders(args.precision, batch, length, state),
                rounds=args.rounds,
                items_per_call=batch,
            )
            cell: dict[str, Any] = {"batch": batch, "length": length}
            cell.update({name: harness.spread(values) for name, values in per_round.items()})
            cell["vs_bare"] = harness.ratios({k: v for k, v in per_round.items() if k != "eager"}, "bare")
            cell["vs_eager"] = harness.ratios(per_round, "eager")
            results.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
    print(json.dumps({"cells": results, "probe": probe_torch(state)}))


# ------------------------------------------------------------------------------------------- parent


def cosine_min(a: list[list[float]], b: list[list[float]]) -> float:
    import torch

    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b)).min())


def speed(args: argparse.Namespace) -> None:
    cells = ["1x16", "8x16"] if args.smoke else ["1x64", "8x64", "32x64", "1x128", "8x128", "32x128"]
    threads_list = [2] if args.smoke else [1, 2]
    rounds = 2 if args.smoke else args.rounds
    runtimes = [r for r in RUNTIMES if r[0] == "torch" or RUNTIMES_PYTHON.exists()]
    if args.smoke:  # one run of every code path: both torch precisions, one of each other runtime
        runtimes = [r for r in runtimes if r in SMOKE_RUNTIMES]
    runs = []
    for threads in threads_list:
        for runtime, precision in runtimes:
            python = sys.executable if runtime == "torch" else str(RUNTIMES_PYTHON)
            command = [python, __file__, "child", "--runtime", runtime, "--precision", precision,
                       "--threads", str(threads), "--rounds", str(rounds), "--cells", *cells]  # fmt: skip
            print(f"{runtime} {precision}, {threads} threads ...", flush=True)
            result = harness.run_child(command, timeout_s=1800)
            runs.append({"runtime": runtime, "precision": precision, "threads": threads, **result})
    reference = next(r for r in runs if r["runtime"] == "torch" and r["precision"] == "fp32")["probe"]
    for run in runs:
        run["cosine_to_torch_fp32"] = cosine_min(run["probe"], reference)
    for run in runs:
        del run["probe"]
    report = {
        "environment": harness.environment(rounds=rounds),
        "command": harness.command_line("bench_engine.py"),
        "runs": runs,
    }
    name = "engine_speed_smoke" if args.smoke else "engine_speed"
    harness.write_report(args.out, name, report, render_speed(report))
    print(render_speed(report))


def render_speed(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Engine speed ({env['date']})",
        "",
        f"Machine: {env['cpu']}, {env['cpu_count']} CPUs; packages {env['packages']}.",
        f"Command: `{report['command']}`. MiniLM, inputs of exactly the cell's length (no padding);",
        f"examples/s, median [min, max] over {env['rounds']} rounds; each runtime in its own process.",
        "",
        "## Bare backbone, every runtime",
        "",
    ]
    cells = [(c["batch"], c["length"]) for c in report["runs"][0]["cells"]]
    for threads in sorted({r["threads"] for r in report["runs"]}):
        lines += [f"### {threads} thread(s)", "", "| runtime | " + " | ".join(f"{b}x{n}" for b, n in cells)
                  + " | pooled cosine to fp32 |", "|---" * (len(cells) + 2) + "|"]  # fmt: skip
        for run in (r for r in report["runs"] if r["threads"] == threads):
            key = "eager" if run["runtime"] == "torch" else "bare"
            speeds = " | ".join(harness.fmt_spread(c[key], 0) for c in run["cells"])
            lines.append(
                f"| {run['runtime']} {run['precision']} | {speeds} | {run['cosine_to_torch_fp32']:.5f} |"
            )
        lines.append("")
    lines += [
        "## The project's encoder on torch: memories over the bare backbone",
        "",
        "Ratios per round, median [min, max]; `bare` = the project's encoder with no memory, `eager` = "
        "transformers' own model. `served-6` includes padding and turning outputs into probabilities.",
        "",
        "| precision | threads | cell | eager ex/s | bare / eager | spartan-1 / bare | spartan-6 / bare | "
        "served-6 / bare | spartan-1 / eager | spartan-6 / eager |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in (r for r in report["runs"] if r["runtime"] == "torch"):
        for c in run["cells"]:

            def ratio(table: str, name: str, c: dict[str, Any] = c) -> str:
                entry = c[table].get(name)
                return harness.fmt_spread(entry, 3) if entry else "-"

            lines.append(
                f"| {run['precision']} | {run['threads']} | {c['batch']}x{c['length']} | "
                f"{harness.fmt_spread(c['eager'], 0)} | {ratio('vs_eager', 'bare')} | "
                f"{ratio('vs_bare', 'spartan-1')} | {ratio('vs_bare', 'spartan-6')} | "
                f"{ratio('vs_bare', 'served-6')} | {ratio('vs_eager', 'spartan-1')} | "
                f"{ratio('vs_eager', 'spartan-6')} |"
            )
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- accuracy


def accuracy(args: argparse.Namespace) -> None:
    """Each shipped memory's test split through the served path at fp32 and at bf16."""
    import torch

    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder
    from app.engine.runner import EncoderRunner, Row
    from app.settings import Settings
    from app.spartan.memfile import load_memory_file
    from app.training.datasets import load_named

    torch.set_num_threads(args.threads)
    cache_dir = Settings().cache_dir
    runners = {
        precision: EncoderRunner(
            SpartanEncoder(load_backbone("all-MiniLM-L6-v2", cache_dir, precision=precision))
        )  # type: ignore[arg-type]
        for precision in ("fp32", "bf16")
    }
    rows_out = []
    for path in sorted(MEMORIES.glob("*.safetensors")):
        identity = runners["fp32"].encoder.identity()
        memory = load_memory_file(path, identity)
        dataset = str(memory.spec.training.get("dataset"))
        config = memory.spec.training.get("config") or {}
        data = load_named(dataset, cache_dir, seed=int(config.get("seed", 42)))  # type: ignore[union-attr]
        examples = data.test[: 200 if args.smoke else None]
        gold = [memory.spec.labels.index(str(ex.label)) for ex in examples]
        scores = {}
        for precision, runner in runners.items():
            outputs = []
            for start in range(0, len(examples), 32):
                chunk = [Row(memory, ex.text, ex.text_pair) for ex in examples[start : start + 32]]
                outputs += [r.outputs for r in runner.run(runner.prepare(chunk))]
            scores[precision] = torch.tensor(outputs)
        labels = {p: s.argmax(-1) for p, s in scores.items()}
        acc = {p: float((labels[p] == torch.tensor(gold)).float().mean()) for p in labels}
        rows_out.append({
            "task": path.stem, "dataset": dataset, "test_rows": len(examples),
            "accuracy_fp32": acc["fp32"], "accuracy_bf16": acc["bf16"],
            "accuracy_change_points": 100 * (acc["bf16"] - acc["fp32"]),
            "label_agreement": float((labels["fp32"] == labels["bf16"]).float().mean()),
            "max_score_difference": float((scores["fp32"] - scores["bf16"]).abs().max()),
        })  # fmt: skip
        print(json.dumps(rows_out[-1]), flush=True)
    report = {
        "environment": harness.environment(threads=args.threads),
        "command": harness.command_line("bench_engine.py"),
        "tasks": rows_out,
    }
    name = "engine_accuracy_smoke" if args.smoke else "engine_accuracy"
    harness.write_report(args.out, name, report, render_accuracy(report))


def render_accuracy(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Accuracy of the default precision (bf16) against fp32 ({env['date']})",
        "",
        f"Command: `{report['command']}`; {env['cpu']}. The shipped memories' test splits, through the "
        "served path (EncoderRunner), fp32 and bf16 backbones.",
        "",
        "| task | test rows | accuracy fp32 | accuracy bf16 | change (points) | labels agree "
        "| max score diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in report["tasks"]:
        lines.append(
            f"| {t['task']} | {t['test_rows']} | {100 * t['accuracy_fp32']:.2f} "
            f"| {100 * t['accuracy_bf16']:.2f} | {t['accuracy_change_points']:+.2f} "
            f"| {100 * t['label_agreement']:.2f}% | {t['max_score_difference']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "accuracy"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--smoke", action="store_true")
        cmd.add_argument("--rounds", type=int, default=5)
        cmd.add_argument("--threads", type=int, default=2)
        cmd.add_argument("--out", type=Path, default=harness.DOCS / "results")
    kid = sub.add_parser("child", help="(internal) one runtime in its own process")
    kid.add_argument("--runtime", required=True)
    kid.add_argument("--precision", required=True)
    kid.add_argument("--threads", type=int, required=True)
    kid.add_argument("--rounds", type=int, required=True)
    kid.add_argument("--cells", nargs="+", required=True)
    args = parser.parse_args()
    {"speed": speed, "accuracy": accuracy, "child": child}[args.command](args)


if __name__ == "__main__":
    main()
