"""The CPU engine: backbone runtimes side by side, what the memories cost on the chosen one, and the
accuracy the default precision keeps (contenders and method: docs/BENCHMARKS.md, "Engine").

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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import harness

RUNTIMES_PYTHON = harness.ROOT / ".venv-runtimes" / "bin" / "python"
RUNTIMES = [
    "torch:fp32",
    "torch:bf16",
    "graph:bf16",  # the service's default: backbone and memories as one OpenVINO graph (app/engine/graph.py)
    "graph:fp32",
    "onnxruntime:fp32",
    "onnxruntime:int8",
    "openvino:fp32",
    "openvino:bf16",
]
SMOKE_RUNTIMES = [
    "torch:fp32",
    "torch:bf16",
    "graph:bf16",
    "onnxruntime:int8",
    "openvino:bf16",
]  # every code path once
CELLS = ["1x64", "8x64", "32x64", "1x128", "8x128", "32x128"]
# fp32 (torch eager) first: the reference; "graph-" = the compiled OpenVINO graph (the default runtime).
PRECISIONS = ("fp32", "bf16", "graph-bf16", "graph-fp32", "int8-per-tensor", "int8-per-channel")


def last_hidden(output: Any) -> Any:
    import torch

    return torch.from_numpy(output) if not hasattr(output, "last_hidden_state") else output.last_hidden_state


def torch_contenders(state: dict[str, Any], batch: int, length: int) -> dict[str, Callable[[], object]]:
    import torch

    from app.engine.backbone import pool
    from app.engine.encoder import RowGroup
    from app.engine.runner import Row

    encoder, eager, runner, memories = state["encoder"], state["eager"], state["runner"], state["memories"]
    inputs = harness.fixed_length_batch(encoder.backbone.tokenizer, batch, length)
    rows = torch.arange(batch)
    contenders: dict[str, Callable[[], object]] = {
        "eager": lambda: pool(last_hidden(eager(**inputs)).float(), inputs["attention_mask"], "mean"),
        "bare": lambda: encoder.forward(inputs, [RowGroup(None, rows)]),
        "spartan-1": lambda: encoder.forward(inputs, [RowGroup(memories[0], rows)]),
    }
    if batch >= 6:
        bounds = [round(i * batch / 6) for i in range(7)]
        groups = [RowGroup(memories[i], torch.arange(bounds[i], bounds[i + 1])) for i in range(6)]
        contenders["spartan-6"] = lambda: encoder.forward(inputs, groups)
        texts = harness.texts_of_length(length - 2, batch)
        served_rows = [Row(memories[i % 6], text, task=f"task-{i % 6}") for i, text in enumerate(texts)]
        prepared = runner.prepare(served_rows)
        contenders["served-6"] = lambda: runner.run(prepared)
    return contenders


def plain_openvino(precision: str, threads: int) -> Callable[..., Any]:
    """transformers' model converted by OpenVINO as it is (no memory): the graph runtime's bare backbone."""
    import openvino as ov
    import torch

    model = harness.encoder().backbone.model  # fp32; its wrapped LayerNorms are inert outside a pass
    sample = harness.fixed_length_batch(harness.encoder().backbone.tokenizer, 2, 16)
    names = list(sample)

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    with torch.no_grad():
        converted = ov.convert_model(
            Hidden(), example_input=tuple(sample[n] for n in names),
            input=[([-1, -1], ov.Type.i64)] * len(names),
        )  # fmt: skip
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    request = ov.Core().compile_model(converted, "CPU", config).create_infer_request()
    return lambda **inputs: request.infer([inputs[n].numpy() for n in names], share_inputs=True)[0].copy()


def torch_child(
    precision: str, cells: list[tuple[int, int]], rounds: int, target_s: float, graph: bool = False
) -> dict[str, Any]:
    """torch eager (graph False), or the service's compiled graph (True; `eager` is then the plain
    backbone converted by OpenVINO, the same runtime without memories)."""
    import torch

    from app.engine.encoder import RowGroup
    from app.engine.process import torch_threads_beside
    from app.engine.routing_tally import RoutingTally
    from app.engine.runner import EncoderRunner

    threads = torch.get_num_threads()
    encoder = harness.encoder(precision, runtime="openvino" if graph else "torch")  # `threads` threads
    # Six distinct memory objects (the shipped files, each loaded twice): six groups in a pass, as six tasks.
    memories = [m for _ in range(2) for m in harness.shipped_memories(encoder).values()][:6]
    eager = plain_openvino(precision, threads) if graph else harness.encoder(precision).backbone.model
    if graph:  # as `spartan serve` runs it: torch keeps one thread for the heads (torch_threads_beside)
        torch.set_num_threads(torch_threads_beside(encoder.graph, threads) or threads)
    state = {"encoder": encoder, "eager": eager, "memories": memories}
    tally = RoutingTally()  # on by default in the service: served-6 counts its routing as served
    for number, memory in enumerate(memories):
        tally.on_memory_change(f"task-{number}", memory)
    state["runner"] = EncoderRunner(encoder, tally)
    results = []
    with torch.inference_mode():
        for batch, length in cells:
            contenders = torch_contenders(state, batch, length)
            per_round = harness.alternate(contenders, rounds=rounds, items_per_call=batch, target_s=target_s)
            cell: dict[str, Any] = {"batch": batch, "length": length}
            cell.update({name: harness.spread(values) for name, values in per_round.items()})
            cell["vs_bare"] = harness.ratios({k: v for k, v in per_round.items() if k != "eager"}, "bare")
            cell["vs_eager"] = harness.ratios(per_round, "eager")
            results.append(cell)
            print(json.dumps(cell), file=sys.stderr, flush=True)
        probe = harness.fixed_length_batch(encoder.backbone.tokenizer, 4, 64)
        pooled = encoder.forward(probe, [RowGroup(None, torch.arange(4))]).pooled
    return {"cells": results, "probe": pooled.tolist()}


def export_onnx(folder: Path) -> tuple[Path, Any]:
    """The fp32 backbone as ONNX (dynamic batch and length), with its tokenizer; the export is made by
    the run's first child that needs it, in the run's folder, and read by the others."""
    import torch

    backbone = harness.encoder().backbone
    if (folder / "backbone.onnx").exists():
        return folder / "backbone.onnx", backbone.tokenizer
    sample = harness.fixed_length_batch(backbone.tokenizer, 2, 16)
    names, path = list(sample), folder / "backbone.onnx"

    class Hidden(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = backbone.model

        def forward(self, *args: Any) -> Any:
            return self.model(**dict(zip(names, args, strict=True))).last_hidden_state

    axes = {name: {0: "batch", 1: "length"} for name in [*names, "hidden"]}
    torch.onnx.export(
        Hidden(), tuple(sample[n] for n in names), str(path), input_names=names, output_names=["hidden"],
        dynamic_axes=axes, opset_version=17, dynamo=False,
    )  # fmt: skip
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

    core = ov.Core()
    config = {"INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
              "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}  # fmt: skip
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    return lambda inputs: request.infer({k: v for k, v in inputs.items() if k in names})[0].copy()


def other_child(runtime: str, precision: str, cells: list[tuple[int, int]], args: Any) -> Any:
    import numpy as np

    path, tokenizer = export_onnx(Path(args.onnx_dir))
    threads, rounds = args.threads[0], args.rounds
    infer = (onnxruntime_session if runtime == "onnxruntime" else openvino_model)(path, precision, threads)

    def batch_of(batch: int, length: int) -> dict[str, Any]:
        return {k: v.numpy() for k, v in harness.fixed_length_batch(tokenizer, batch, length).items()}

    results = []
    for batch, length in cells:
        inputs = batch_of(batch, length)
        run = {"bare": lambda inputs=inputs: infer(inputs)}
        per_round = harness.alternate(run, rounds=rounds, items_per_call=batch, target_s=args.target_seconds)
        results.append({"batch": batch, "length": length, "bare": harness.spread(per_round["bare"])})
    probe = batch_of(4, 64)
    weights = probe["attention_mask"][..., None].astype(np.float32)  # mean pooling, as the backbone's
    pooled = (infer(probe) * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return {"cells": results, "probe": pooled.tolist()}


def child(args: Any) -> None:
    import torch

    torch.set_num_threads(args.threads[0])  # this child is its own process: its start
    cells = [tuple(map(int, cell.split("x"))) for cell in args.cells]
    runtime, precision = args.runtime.split(":")
    if runtime in ("torch", "graph"):
        result = torch_child(precision, cells, args.rounds, args.target_seconds, graph=runtime == "graph")
    else:
        result = other_child(runtime, precision, cells, args)  # type: ignore[arg-type]
    print(json.dumps(result))


def speed(args: Any) -> None:
    import torch

    if args.smoke:
        args.cells, args.threads, args.rounds, args.runtimes = ["1x16", "8x16"], [2], 2, SMOKE_RUNTIMES
        args.target_seconds = 0.02
    onnx_dir = tempfile.mkdtemp(prefix="bench-engine-")
    report: dict[str, Any] = {"environment": harness.environment(rounds=args.rounds), "runs": []}
    runtimes = [r for r in args.runtimes if r.split(":")[0] in ("torch", "graph") or RUNTIMES_PYTHON.exists()]
    runs = report["runs"]
    for threads in args.threads:
        for runtime in runtimes:
            python = sys.executable if runtime.split(":")[0] in ("torch", "graph") else str(RUNTIMES_PYTHON)
            command = [python, __file__, "child", "--runtime", runtime, "--threads", str(threads),
                       "--rounds", str(args.rounds), "--target-seconds", str(args.target_seconds),
                       "--onnx-dir", onnx_dir, "--cells", *args.cells]  # fmt: skip
            print(f"{runtime}, {threads} threads ...", flush=True)
            name, precision = runtime.split(":")
            result = harness.run_child(command, timeout_s=1800)
            runs.append({"runtime": name, "precision": precision, "threads": threads, **result})
    # The reference is torch fp32; a run without it compares with its first runtime instead (said in the md).
    fp32 = next((r for r in runs if (r["runtime"], r["precision"]) == ("torch", "fp32")), runs[0])
    report["cosine_reference"] = f"{fp32['runtime']} {fp32['precision']}"
    reference = torch.tensor(fp32["probe"])
    for run in runs:
        cosine = torch.nn.functional.cosine_similarity(torch.tensor(run.pop("probe")), reference)
        run["cosine_to_torch_fp32"] = float(cosine.min())
    shutil.rmtree(onnx_dir, ignore_errors=True)
    report["command"] = harness.command_line("bench_engine.py")
    harness.finish(args.out, args.name.format(command="speed"), report, render_speed, smoke=args.smoke)


def render_speed(report: dict[str, Any]) -> str:
    lines = [
        f"# Engine speed ({report['environment']['date']})",
        "",
        harness.header(report),
        "",
        "MiniLM, inputs of exactly the cell's length (no padding); examples/s, median [min, max] over "
        f"{report['environment']['rounds']} rounds; each runtime in its own process.",
        "",
        "## Bare backbone, every runtime",
    ]
    cells = [f"{c['batch']}x{c['length']}" for c in report["runs"][0]["cells"]]
    for threads in sorted({r["threads"] for r in report["runs"]}):
        rows = [
            (f"{r['runtime']} {r['precision']}",
             *(harness.fmt_spread(c["eager" if r["runtime"] in ("torch", "graph") else "bare"], 0)
               for c in r["cells"]),
             f"{r['cosine_to_torch_fp32']:.5f}")
            for r in report["runs"] if r["threads"] == threads
        ]  # fmt: skip
        head = ("runtime", *cells, f"pooled cosine to {report.get('cosine_reference', 'torch fp32')}")
        lines += ["", f"### {threads} thread(s)", "", *harness.table(head, rows)]

    columns = [("vs_eager", "bare"), *(("vs_bare", n) for n in ("spartan-1", "spartan-6", "served-6"))]
    columns += [("vs_eager", "spartan-1"), ("vs_eager", "spartan-6")]
    head = ("runtime", "threads", "cell", "eager ex/s", *(f"{n} / {table[3:]}" for table, n in columns))
    rows = [
        (f"{r['runtime']} {r['precision']}", r["threads"], f"{c['batch']}x{c['length']}",
         harness.fmt_spread(c["eager"], 0),
         *(harness.fmt_spread(c[table].get(name), 3) for table, name in columns))
        for r in report["runs"] if r["runtime"] in ("torch", "graph") for c in r["cells"]
    ]  # fmt: skip
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


def int8_encoder(scheme: str) -> Any:
    """The service's fp32 encoder with every backbone Linear int8 (`scheme`: per-tensor, per-channel)."""
    encoder = harness.encoder()
    harness.int8_backbone(encoder.backbone.model, scheme)
    return encoder


def accuracy(args: Any) -> None:
    """Each shipped memory's test split through the served path (EncoderRunner) with the fp32 backbone and
    with each cheaper precision: bf16 (the default) and int8 (the backbone's Linears, both weight scales)."""
    import torch

    from app.engine.runner import EncoderRunner, Row
    from app.settings import Settings
    from app.training.datasets import load_named

    torch.set_num_threads(args.threads[0])
    report: dict[str, Any] = {"environment": harness.environment(threads=args.threads[0]), "tasks": []}
    encoders = {p: variant_encoder(p) for p in PRECISIONS}
    runners = {precision: EncoderRunner(encoder) for precision, encoder in encoders.items()}
    for task, memory in harness.shipped_memories(encoders["fp32"]).items():
        dataset, config = str(memory.spec.training.get("dataset")), memory.spec.training.get("config") or {}
        data = load_named(dataset, Settings().cache_dir, seed=int(config.get("seed", 42)))
        examples = data.test[: 64 if args.smoke else None]
        gold = torch.tensor([memory.spec.labels.index(str(ex.label)) for ex in examples])
        chunks = [
            [Row(memory, ex.text, ex.text_pair) for ex in examples[i : i + 32]]
            for i in range(0, len(examples), 32)
        ]
        scores = {
            precision: torch.tensor([r.outputs for c in chunks for r in runner.run(runner.prepare(c))])
            for precision, runner in runners.items()
        }
        labels = {p: s.argmax(-1) for p, s in scores.items()}
        acc = {p: float((labels[p] == gold).float().mean()) for p in labels}
        variants = {
            p: {"accuracy": acc[p], "accuracy_change_points": 100 * (acc[p] - acc["fp32"]),
                "label_agreement": float((labels[p] == labels["fp32"]).float().mean()),
                "max_score_difference": float((scores[p] - scores["fp32"]).abs().max())}
            for p in PRECISIONS[1:]
        }  # fmt: skip
        row = {"task": task, "dataset": dataset, "test_rows": len(examples), "accuracy_fp32": acc["fp32"]}
        report["tasks"].append({**row, "variants": variants})
        print(json.dumps(report["tasks"][-1]), flush=True)
    report["command"] = harness.command_line("bench_engine.py")
    harness.finish(args.out, args.name.format(command="accuracy"), report, render_accuracy, smoke=args.smoke)


def variant_encoder(variant: str) -> Any:
    if variant.startswith("int8"):
        return int8_encoder(variant[5:])
    if variant.startswith("graph-"):
        return harness.encoder(variant[6:], runtime="openvino")
    return harness.encoder(variant)


def render_accuracy(report: dict[str, Any]) -> str:
    rows = [
        (t["task"], t["test_rows"], f"{100 * t['accuracy_fp32']:.2f}", p, f"{100 * v['accuracy']:.2f}",
         f"{v['accuracy_change_points']:+.2f}", f"{100 * v['label_agreement']:.2f}%",
         f"{v['max_score_difference']:.4f}")
        for t in report["tasks"] for p, v in t["variants"].items()
    ]  # fmt: skip
    head = ("task", "test rows", "accuracy fp32", "precision", "accuracy", "change (points)", "labels agree",
            "max score diff")  # fmt: skip
    return "\n".join([
        f"# Accuracy of the cheaper precisions against fp32 ({report['environment']['date']})",
        "",
        harness.header(report),
        "",
        "The shipped memories' test splits through the served path (EncoderRunner); bf16 = the default "
        "precision, int8 = the backbone's Linear layers (torch dynamic quantisation, per-tensor or "
        "per-channel "
        "weight scales). Memories and heads stay float32.",
        "",
        *harness.table(head, rows),
    ]) + "\n"  # fmt: skip


def main() -> None:
    cli = harness.parser(__doc__, harness.RESULTS, name="engine_{command}", rounds=5, threads=None)
    cli.add_argument("command", choices=("speed", "accuracy", "child"), help="child: (internal) one runtime")
    cli.add_argument(
        "--threads", type=int, nargs="+", help="torch threads (speed: each in turn; default 1 2)"
    )
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
