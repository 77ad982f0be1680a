"""The CPU engine: backbone runtimes side by side, what the memories cost on the chosen one, and the
accuracy the cheaper precisions keep (contenders and method: docs/BENCHMARKS.md, "Engine").

    python benchmarks/bench_engine.py speed       # every runtime, each in its own process (~10 min)
    python benchmarks/bench_engine.py speed --runtimes torch:fp32 --threads 2 --cells 1x128 32x128 --rounds 9
                                                  # the memories' overhead (docs/BENCHMARKS.md, section 2)
    python benchmarks/bench_engine.py accuracy    # the shipped memories, fp32 vs bf16 (the default) and int8
    python benchmarks/bench_engine.py speed --smoke --out /tmp/x   # seconds; run by the tests
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.engine.backbone import pool
from app.engine.encoder import RowGroup
from app.engine.process import torch_threads_beside
from app.engine.routing_tally import RoutingTally
from app.engine.runner import EncoderRunner, Row
from app.settings import Settings
from app.training.datasets import load_named
from benchmarks import harness

RUNTIMES_PYTHON = harness.ROOT / ".venv-runtimes" / "bin" / "python"
# The project's encoder; graph:bf16 (backbone and memories as one OpenVINO graph) is the service's default.
ENCODER_RUNTIMES = ["torch:fp32", "torch:bf16", "graph:bf16", "graph:fp32"]
RUNTIMES = [*ENCODER_RUNTIMES, "onnxruntime:fp32", "onnxruntime:int8", "openvino:fp32", "openvino:bf16"]
SMOKE_RUNTIMES = ["torch:fp32", "torch:bf16", "graph:bf16", "onnxruntime:int8", "openvino:bf16"]  # every path
CELLS = ["1x64", "8x64", "32x64", "1x128", "8x128", "32x128"]
# fp32 (torch eager) first: the reference; "graph-" = the compiled OpenVINO graph (the default runtime).
PRECISIONS = ("fp32", "bf16", "graph-bf16", "graph-fp32", "int8-per-tensor", "int8-per-channel")


def on_encoder(runtime: str) -> bool:
    """torch and graph run the project's encoder, here; the others its bare ONNX export, in .venv-runtimes."""
    return runtime.split(":")[0] in ("torch", "graph")


def measure(cells: list[tuple[int, int]], contenders_of: Callable[..., Any], args: Any) -> list[Any]:
    """Each cell's contenders in rotated rounds; with an `eager` among them, the ratios per round too."""
    results = []
    for batch, length in cells:
        contenders = contenders_of(batch, length)
        per_round = harness.alternate(
            contenders, rounds=args.rounds, items_per_call=batch, target_s=args.target_seconds
        )
        cell = {"batch": batch, "length": length, **{n: harness.spread(v) for n, v in per_round.items()}}
        if "eager" in per_round:
            cell["vs_bare"] = harness.ratios({k: v for k, v in per_round.items() if k != "eager"}, "bare")
            cell["vs_eager"] = harness.ratios(per_round, "eager")
        results.append(cell)
        print(json.dumps(cell), file=sys.stderr, flush=True)
    return results


def torch_child(runtime: str, precision: str, cells: list[tuple[int, int]], args: Any) -> dict[str, Any]:
    """torch eager, or the service's compiled graph (`eager` is then the plain backbone converted by
    OpenVINO: the same runtime without memories)."""
    threads, graph = torch.get_num_threads(), runtime == "graph"
    encoder = harness.encoder(precision, runtime="openvino" if graph else "torch")  # `threads` threads
    # Six distinct memory objects (the shipped files, each loaded twice): six groups in a pass, as six tasks.
    memories = [m for _ in range(2) for m in harness.shipped_memories(encoder).values()][:6]
    eager = plain_openvino(precision, threads) if graph else plain_torch(precision)
    if graph:  # as `spartan serve` runs it: torch keeps one thread for the heads (torch_threads_beside)
        torch.set_num_threads(torch_threads_beside(encoder.graph, threads) or threads)
    tally = RoutingTally()  # on by default in the service: served-6 counts its routing as served
    for number, memory in enumerate(memories):
        tally.on_memory_change(f"task-{number}", memory)
    runner = EncoderRunner(encoder, tally)

    def contenders(batch: int, length: int) -> dict[str, Callable[[], object]]:
        inputs = harness.fixed_length_batch(encoder.backbone.tokenizer, batch, length)
        rows = torch.arange(batch)
        found: dict[str, Callable[[], object]] = {
            "eager": lambda: pool(eager(**inputs).float(), inputs["attention_mask"], "mean"),
            "bare": lambda: encoder.forward(inputs, [RowGroup(None, rows)]),
            "spartan-1": lambda: encoder.forward(inputs, [RowGroup(memories[0], rows)]),
        }
        if batch >= 6:
            bounds = [round(i * batch / 6) for i in range(7)]
            groups = [RowGroup(memories[i], torch.arange(bounds[i], bounds[i + 1])) for i in range(6)]
            found["spartan-6"] = lambda: encoder.forward(inputs, groups)
            texts = enumerate(harness.texts_of_length(length - 2, batch))
            prepared = runner.prepare([Row(memories[i % 6], t, task=f"task-{i % 6}") for i, t in texts])
            found["served-6"] = lambda: runner.run(prepared)
        return found

    with torch.inference_mode():
        results = measure(cells, contenders, args)
        probe = harness.fixed_length_batch(encoder.backbone.tokenizer, 4, 64)
        pooled = encoder.forward(probe, [RowGroup(None, torch.arange(4))]).pooled
    return {"cells": results, "probe": pooled.tolist()}


def plain_torch(precision: str) -> Callable[..., Any]:
    """transformers' own model, no hooks: every cost the project adds is counted."""
    model = harness.encoder(precision).backbone.model

    def hidden(**inputs: Any) -> Any:
        return model(**inputs).last_hidden_state

    return hidden


def positional(backbone: Any) -> tuple[Any, tuple[Any, ...], list[str]]:
    """`backbone`'s model as a module of positional inputs that returns the last hidden state (what the
    converters take), a sample input for it, and the input names."""
    sample = harness.fixed_length_batch(backbone.tokenizer, 2, 16)
    names = list(sample)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone.model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    return Hidden(), tuple(sample[n] for n in names), names


def openvino_compiled(model: Any, precision: str, threads: int) -> Any:
    import openvino as ov  # here only: a torch child never loads OpenVINO

    hint = "bf16" if precision == "bf16" else "f32"
    config = dict(INFERENCE_PRECISION_HINT=hint, INFERENCE_NUM_THREADS=threads, PERFORMANCE_HINT="LATENCY")
    return ov.Core().compile_model(model, "CPU", config)


def plain_openvino(precision: str, threads: int) -> Callable[..., Any]:
    """transformers' model converted by OpenVINO as it is (no memory): the graph runtime's bare backbone."""
    import openvino as ov

    backbone = harness.encoder().backbone  # fp32; its wrapped LayerNorms are inert outside a pass
    module, sample, names = positional(backbone)
    with torch.no_grad():
        shapes = [([-1, -1], ov.Type.i64)] * len(names)  # dynamic batch and length
        converted = ov.convert_model(module, example_input=sample, input=shapes)
    request = openvino_compiled(converted, precision, threads).create_infer_request()

    def hidden(**inputs: Any) -> Any:
        outputs = request.infer([inputs[n].numpy() for n in names], share_inputs=True)
        return torch.from_numpy(outputs[0].copy())

    return hidden


def export_onnx(folder: Path) -> tuple[Path, Any]:
    """The fp32 backbone as ONNX (dynamic batch and length), with its tokenizer; the export is made by
    the run's first child that needs it, in the run's folder, and read by the others."""
    backbone, path = harness.encoder().backbone, folder / "backbone.onnx"
    if not path.exists():
        module, sample, names = positional(backbone)
        axes = {name: {0: "batch", 1: "length"} for name in [*names, "hidden"]}
        names_out = dict(input_names=names, output_names=["hidden"], dynamic_axes=axes)
        torch.onnx.export(module, sample, str(path), **names_out, opset_version=17, dynamo=False)
    return path, backbone.tokenizer


def onnxruntime_session(path: Path, precision: str, threads: int) -> Callable[[Any], Any]:
    import onnxruntime as ort

    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path.with_name("backbone-int8.onnx")
        quantize_dynamic(str(path), str(quantized), per_channel=True, weight_type=QuantType.QInt8)
        path = quantized
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return lambda inputs: session.run(None, {k: v for k, v in inputs.items() if k in names})[0]


def openvino_model(path: Path, precision: str, threads: int) -> Callable[[Any], Any]:
    import openvino as ov

    compiled = openvino_compiled(ov.Core().read_model(str(path)), precision, threads)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    return lambda inputs: request.infer({k: v for k, v in inputs.items() if k in names})[0].copy()


def other_child(runtime: str, precision: str, cells: list[tuple[int, int]], args: Any) -> Any:
    """The bare backbone's ONNX export on ONNX Runtime or OpenVINO."""
    path, tokenizer = export_onnx(Path(args.onnx_dir))
    session = onnxruntime_session if runtime == "onnxruntime" else openvino_model
    infer = session(path, precision, args.threads[0])

    def batch_of(batch: int, length: int) -> dict[str, Any]:
        return {k: v.numpy() for k, v in harness.fixed_length_batch(tokenizer, batch, length).items()}

    def contenders(batch: int, length: int) -> dict[str, Callable[[], object]]:
        inputs = batch_of(batch, length)
        return {"bare": lambda: infer(inputs)}

    results = measure(cells, contenders, args)
    probe = batch_of(4, 64)
    weights = probe["attention_mask"][..., None].astype(np.float32)  # mean pooling, as the backbone's
    pooled = (infer(probe) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return {"cells": results, "probe": pooled.tolist()}


def child(args: Any) -> None:
    torch.set_num_threads(args.threads[0])  # this child is its own process: its start
    cells = [tuple(map(int, cell.split("x"))) for cell in args.cells]
    runtime, precision = args.runtime.split(":")
    run = torch_child if on_encoder(runtime) else other_child
    print(json.dumps(run(runtime, precision, cells, args)))


def speed(args: Any) -> None:
    if args.smoke:
        args.cells, args.threads, args.rounds, args.runtimes = ["1x16", "8x16"], [2], 2, SMOKE_RUNTIMES
        args.target_seconds = 0.02
    onnx_dir = tempfile.mkdtemp(prefix="bench-engine-")
    report: dict[str, Any] = {"environment": harness.environment(rounds=args.rounds), "runs": []}
    runs = report["runs"]
    for threads in args.threads:
        for runtime in [r for r in args.runtimes if on_encoder(r) or RUNTIMES_PYTHON.exists()]:
            python = sys.executable if on_encoder(runtime) else str(RUNTIMES_PYTHON)
            flags = ["--runtime", runtime, "--threads", str(threads), "--onnx-dir", onnx_dir]
            flags += ["--rounds", str(args.rounds), "--target-seconds", str(args.target_seconds)]
            command = [python, __file__, "child", *flags, "--cells", *args.cells]
            print(f"{runtime}, {threads} threads ...", flush=True)
            result = harness.run_child(command, timeout_s=1800)
            name, precision = runtime.split(":")
            runs.append({"runtime": name, "precision": precision, "threads": threads, **result})
    # The reference is torch fp32; a run without it compares with its first runtime instead (said in the md).
    fp32 = next((r for r in runs if (r["runtime"], r["precision"]) == ("torch", "fp32")), runs[0])
    report["cosine_reference"] = label(fp32)
    reference = torch.tensor(fp32["probe"])
    for run in runs:
        cosine = torch.nn.functional.cosine_similarity(torch.tensor(run.pop("probe")), reference)
        run["cosine_to_torch_fp32"] = float(cosine.min())
    shutil.rmtree(onnx_dir, ignore_errors=True)
    report["command"] = harness.command_line("bench_engine.py")
    harness.finish(args.out, args.name.format(command="speed"), report, render_speed, smoke=args.smoke)


def heading(report: dict[str, Any], title: str, intro: str) -> list[str]:
    return [f"# {title} ({report['environment']['date']})", "", harness.header(report), "", intro, ""]


def label(run: dict[str, Any]) -> str:
    return f"{run['runtime']} {run['precision']}"


def bare_speeds(run: dict[str, Any]) -> list[str]:
    """The bare backbone's examples/s per cell: transformers' own model where the encoder runs."""
    key = "eager" if on_encoder(run["runtime"]) else "bare"
    return [harness.fmt_spread(cell[key], 0) for cell in run["cells"]]


def render_speed(report: dict[str, Any]) -> str:
    runs, rounds = report["runs"], report["environment"]["rounds"]
    intro = "MiniLM, inputs of exactly the cell's length (no padding); examples/s, median [min, max] over "
    lines = heading(report, "Engine speed", f"{intro}{rounds} rounds; each runtime in its own process.")
    lines.append("## Bare backbone, every runtime")
    cells = [f"{c['batch']}x{c['length']}" for c in runs[0]["cells"]]
    head = ("runtime", *cells, f"pooled cosine to {report.get('cosine_reference', 'torch fp32')}")
    for threads in sorted({r["threads"] for r in runs}):
        rows = [
            (label(r), *bare_speeds(r), f"{r['cosine_to_torch_fp32']:.5f}")
            for r in runs
            if r["threads"] == threads
        ]
        lines += ["", f"### {threads} thread(s)", "", *harness.table(head, rows)]

    columns = [("vs_eager", "bare"), *(("vs_bare", n) for n in ("spartan-1", "spartan-6", "served-6"))]
    columns += [("vs_eager", "spartan-1"), ("vs_eager", "spartan-6")]
    head = ("runtime", "threads", "cell", "eager ex/s", *(f"{n} / {table[3:]}" for table, n in columns))
    rows = []
    for run in [r for r in runs if on_encoder(r["runtime"])]:
        for c in run["cells"]:
            ratios = [harness.fmt_spread(c[table].get(name), 3) for table, name in columns]
            eager = harness.fmt_spread(c["eager"], 0)
            rows.append((label(run), run["threads"], f"{c['batch']}x{c['length']}", eager, *ratios))
    lines += [
        "",
        "## The project's encoder: memories over the bare backbone",
        "",
        "Ratios per round, median [min, max]; `bare` = the project's encoder with no memory, `eager` = "
        "transformers' own model (on `graph`: that model converted by OpenVINO, the same runtime without "
        "memories). `served-6` includes padding and turning outputs into probabilities.",
        "",
        *harness.table(head, rows),
    ]
    return "\n".join(lines) + "\n"


def variant_encoder(variant: str) -> Any:
    """fp32/bf16 on torch, graph-* on the compiled graph, int8-* the fp32 encoder with every backbone
    Linear int8 (per-tensor or per-channel weight scales)."""
    if variant.startswith("graph-"):
        return harness.encoder(variant[6:], runtime="openvino")
    if not variant.startswith("int8"):
        return harness.encoder(variant)
    encoder = harness.encoder()
    harness.int8_backbone(encoder.backbone.model, variant[5:])
    return encoder


def compare(scores: dict[str, Any], gold: Any) -> tuple[float, dict[str, dict[str, float]]]:
    """fp32's accuracy, and each cheaper precision's accuracy and how far it moved from fp32."""
    labels = {p: s.argmax(-1) for p, s in scores.items()}
    acc = {p: float((labels[p] == gold).float().mean()) for p in labels}
    variants = {
        p: {
            "accuracy": acc[p],
            "accuracy_change_points": 100 * (acc[p] - acc["fp32"]),
            "label_agreement": float((labels[p] == labels["fp32"]).float().mean()),
            "max_score_difference": float((scores[p] - scores["fp32"]).abs().max()),
        }
        for p in PRECISIONS[1:]
    }
    return acc["fp32"], variants


def accuracy(args: Any) -> None:
    """Each shipped memory's test split through the served path (EncoderRunner), in every precision."""
    torch.set_num_threads(args.threads[0])
    report: dict[str, Any] = {"environment": harness.environment(threads=args.threads[0]), "tasks": []}
    runners = {precision: EncoderRunner(variant_encoder(precision)) for precision in PRECISIONS}
    for task, memory in harness.shipped_memories(runners["fp32"].encoder).items():
        dataset, config = str(memory.spec.training.get("dataset")), memory.spec.training.get("config") or {}
        data = load_named(dataset, Settings().cache_dir, seed=int(config.get("seed", 42)))
        examples = data.test[: 64 if args.smoke else None]
        gold = torch.tensor([memory.spec.labels.index(str(ex.label)) for ex in examples])
        rows = [Row(memory, ex.text, ex.text_pair) for ex in examples]
        chunks = [rows[i : i + 32] for i in range(0, len(rows), 32)]
        scores = {
            precision: torch.tensor([r.outputs for c in chunks for r in runner.run(runner.prepare(c))])
            for precision, runner in runners.items()
        }
        accuracy_fp32, variants = compare(scores, gold)
        row = {"task": task, "dataset": dataset, "test_rows": len(examples), "accuracy_fp32": accuracy_fp32}
        report["tasks"].append({**row, "variants": variants})
        print(json.dumps(report["tasks"][-1]), flush=True)
    report["command"] = harness.command_line("bench_engine.py")
    harness.finish(args.out, args.name.format(command="accuracy"), report, render_accuracy, smoke=args.smoke)


def render_accuracy(report: dict[str, Any]) -> str:
    rows = []
    for task in report["tasks"]:
        for p, v in task["variants"].items():
            change, difference = f"{v['accuracy_change_points']:+.2f}", f"{v['max_score_difference']:.4f}"
            variant = (p, f"{100 * v['accuracy']:.2f}", change, f"{v['label_agreement']:.2%}", difference)
            rows.append((task["task"], task["test_rows"], f"{100 * task['accuracy_fp32']:.2f}", *variant))
    intro = (
        "The shipped memories' test splits through the served path (EncoderRunner); bf16 = the default "
        "precision, int8 = the backbone's Linear layers (torch dynamic quantisation, per-tensor or "
        "per-channel weight scales). Memories and heads stay float32."
    )
    head = ("task", "test rows", "accuracy fp32", "precision", "accuracy", "change (points)")
    head += ("labels agree", "max score diff")
    lines = heading(report, "Accuracy of the cheaper precisions against fp32", intro)
    return "\n".join([*lines, *harness.table(head, rows)]) + "\n"


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS, name="engine_{command}", rounds=5, threads=None)
    cli.add_argument("command", choices=("speed", "accuracy", "child"), help="child: (internal) one runtime")
    threads = "torch threads (speed: each in turn; default 1 2)"
    cli.add_argument("--threads", type=int, nargs="+", help=threads)
    cli.add_argument("--cells", nargs="+", default=CELLS, help="BATCHxLENGTH")
    cli.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=RUNTIMES)
    cli.add_argument("--runtime", choices=RUNTIMES, help="child: its runtime")
    cli.add_argument("--target-seconds", type=float, default=0.5, help="speed: length of one timing")
    cli.add_argument("--onnx-dir", help="child: the run's folder of the ONNX export")
    args = cli.parse_args()
    args.threads = args.threads or ([1, 2] if args.command == "speed" else [2])
    {"speed": speed, "accuracy": accuracy, "child": child}[args.command](args)


if __name__ == "__main__":
    main()
