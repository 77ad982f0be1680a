"""The `spartan` command line: fetch assets, train and score task memories, serve them."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from app.errors import SpartanError
from app.remote_cli import register as register_remote_commands
from app.settings import Settings

if TYPE_CHECKING:
    from torch import Tensor

    from app.engine.encoder import SpartanEncoder
    from app.spartan.memory import TaskMemory
    from app.training.datasets import Example, TaskData

cli = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)
register_remote_commands(cli)  # spartan tasks ..., spartan predict ...: app/remote_cli.py

CacheDir = Annotated[
    Path | None, typer.Option(help="Asset cache folder (default: $SPARTAN_CACHE_DIR or the user cache dir).")
]
BackboneOpt = Annotated[
    str | None,
    typer.Option(help="Backbone: asset name, local model folder or hub id (default from settings)."),
]
DatasetOpt = Annotated[
    str | None,
    typer.Option("--dataset", help="Named offline dataset (movie, imdb, banking77, clinc150, trec, ...)."),
]
TrainFileOpt = Annotated[Path | None, typer.Option("--train-file", help="Training file: CSV, TSV or JSONL.")]
DevFileOpt = Annotated[Path | None, typer.Option("--dev-file", help="Dev file (default: a seeded split).")]
TestFileOpt = Annotated[Path | None, typer.Option("--test-file", help="Test file (default: a seeded split).")]
GlueOpt = Annotated[
    Path | None, typer.Option("--glue", help="A GLUE-layout task folder (train.tsv, dev.tsv).")
]
TextColOpt = Annotated[str, typer.Option(help="Text column of user files.")]
PairColOpt = Annotated[str | None, typer.Option(help="Second-text column of user files (pair tasks).")]
LabelColOpt = Annotated[str, typer.Option(help="Label column of user files.")]
PredictionsOpt = Annotated[
    Path | None,
    typer.Option(
        help="Write one JSON line per scored example: text, pair, label (gold), predicted, score "
        "(the predicted class's probability; regression: predicted is the value)."
    ),
]
TaskTypeOpt = Annotated[
    str | None, typer.Option(help="classification or regression (default: inferred from the labels).")
]


def _settings(
    cache_dir: Path | None = None, backbone: str | None = None, threads: int | None = None
) -> Settings:
    overrides = {
        key: value
        for key, value in {"cache_dir": cache_dir, "backbone": backbone, "torch_threads": threads}.items()
        if value is not None
    }
    return Settings(**overrides)  # type: ignore[arg-type]


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@cli.command()
def fetch(
    names: Annotated[
        list[str] | None, typer.Argument(help="Assets to fetch (default: MiniLM + all datasets).")
    ] = None,
    cache_dir: CacheDir = None,
) -> None:
    """Download the pinned offline assets (backbones, datasets), verified by sha256."""
    from app.assets.fetch import DEFAULT_ASSETS
    from app.assets.fetch import fetch as fetch_assets

    settings = _settings(cache_dir)
    try:
        paths = fetch_assets(names or list(DEFAULT_ASSETS), settings.cache_dir)
    except SpartanError as err:
        _fail(err)
        return
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def _load_data(
    cache_dir: Path,
    dataset: str | None,
    train_file: Path | None,
    dev_file: Path | None,
    test_file: Path | None,
    glue: Path | None,
    text_column: str,
    pair_column: str | None,
    label_column: str,
    task_type: str | None,
    seed: int,
) -> TaskData:
    from app.training.datasets import load_files, load_glue, load_named

    chosen = [x for x in (dataset, train_file, glue) if x is not None]
    if len(chosen) != 1:
        raise typer.BadParameter("give exactly one of --dataset, --train-file or --glue")
    if dataset is not None:
        return load_named(dataset, cache_dir, seed=seed)
    if glue is not None:
        return load_glue(glue, seed=seed)
    assert train_file is not None
    return load_files(
        train_file,
        dev=dev_file,
        test=test_file,
        text_column=text_column,
        label_column=label_column,
        pair_column=pair_column,
        task_type=task_type,
        seed=seed,
    )


def _report_reads(data: TaskData) -> None:
    """What reading the user's files found, on stderr (eval's stdout is its JSON)."""
    for read in data.reads:
        typer.echo(f"read {read.summary()}", err=True)
        for warning in read.warnings:
            typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)


def _scored_source(
    split: str,
    dataset: str | None,
    train_file: Path | None,
    dev_file: Path | None,
    test_file: Path | None,
    glue: Path | None,
    seed: int,
) -> tuple[str | None, str]:
    """(the file whose rows were scored, or None; what exactly was scored, in words)."""
    if dataset is not None:
        return None, f"the {split} split of dataset {dataset} (seed {seed})"
    if glue is not None:
        if split == "test":
            return str(glue), f"GLUE's dev file in {glue} (GLUE's test has no labels)"
        what = "a seeded 10% of" if split == "dev" else "the rest of"
        return str(glue / "train.tsv"), f"{what} {glue / 'train.tsv'} (seed {seed})"
    given = {"train": train_file, "dev": dev_file, "test": test_file}[split]
    if given is not None:
        return str(given), f"every row of {given}" if split != "train" else f"the training rows of {given}"
    assert train_file is not None
    return str(train_file), (
        f"a seeded {split} split cut from the training file {train_file} (seed {seed}), not a file of "
        f"its own: pass --{split}-file to score one"
    )


def _memory_labelled(data: TaskData, memory: TaskMemory) -> TaskData:
    """The data with the memory's class order (a test file may lack some classes); an error that
    names only the labels that differ when the data has classes the memory does not know."""
    from app.training.datasets import label_difference

    spec = memory.spec
    if spec.task_type != data.task_type:
        raise SpartanError(f"the memory is a {spec.task_type} task, the data {data.task_type}")
    if spec.task_type != "classification" or data.labels == spec.labels:
        return data
    if not set(data.labels) <= set(spec.labels):
        raise SpartanError(
            f"the data's labels differ from the memory's {len(spec.labels)}: "
            f"{label_difference(spec.labels, data.labels)} (extra: in the data, not the memory)"
        )
    return replace(data, labels=spec.labels)


def _write_predictions(path: Path, memory: TaskMemory, examples: list[Example], outputs: Tensor) -> None:
    from app.training.trainer import prediction_records

    with path.open("w", encoding="utf-8") as out:
        for record in prediction_records(memory, examples, outputs):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _encoder(settings: Settings, *, serving_precision: bool) -> SpartanEncoder:
    """The encoder of this command: `eval` scores at the service's precision (so its labels are the
    served ones); `train` always runs the backbone in float32 (gradients flow through it)."""
    from app.engine.backbone import load_backbone
    from app.engine.encoder import SpartanEncoder
    from app.engine.process import configure_torch_threads
    from app.engine.serving import serving_encoder

    configure_torch_threads(settings.torch_threads)  # this command is the process: its start
    if serving_precision:  # one pass at a time here: one stream, on every thread the command has
        return serving_encoder(settings.model_copy(update={"engine_streams": 1}))
    return SpartanEncoder(load_backbone(settings.backbone, settings.cache_dir, precision="fp32"))


@cli.command()
def train(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the memory file.")],
    dataset: DatasetOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    test_file: TestFileOpt = None,
    glue: GlueOpt = None,
    text_column: TextColOpt = "text",
    pair_column: PairColOpt = None,
    label_column: LabelColOpt = "label",
    task_type: TaskTypeOpt = None,
    report: Annotated[
        Path | None, typer.Option(help="JSON report path (default: OUTPUT with .json).")
    ] = None,
    few_shot: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train on N examples only, with the few-shot recipe (app/training/trainer.py "
            "few_shot_config: memories in the top half of the layers, their lower layers run once per "
            "example; its epochs, lr and dev schedule unless given).",
        ),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(min=1, help="Default 3; the recipe's with --few-shot.")
    ] = None,
    lr: Annotated[
        float | None, typer.Option(min=0.0, help="Default 1e-3; the recipe's with --few-shot.")
    ] = None,
    memory_layers: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Memories (and LayerNorm copies) in the top N layers only; the layers below then run "
            "once per example, not every step. Default: every layer; the recipe's with --few-shot.",
        ),
    ] = None,
    eval_every: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Score dev after every N-th epoch (and the last). Default 1; the recipe's with --few-shot.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_length: Annotated[int, typer.Option(min=8)] = 128,
    seed: int = 42,
    parents: Annotated[int, typer.Option(min=1, help="E: parents per layer.")] = 16,
    children: Annotated[int, typer.Option(min=1, help="C: children per parent.")] = 3,
    top_k: Annotated[int, typer.Option(min=1, help="k: parents used per token.")] = 8,
    temperature: Annotated[
        float, typer.Option(min=1e-3, max=1e3, help="T: child softmax temperature.")
    ] = 1.6,
    layernorm: Annotated[bool, typer.Option(help="Train the task's own LayerNorm weights.")] = True,
    balance_weight: Annotated[float, typer.Option(min=0.0, help="Load-balancing loss weight.")] = 0.0,
    backbone: BackboneOpt = None,
    cache_dir: CacheDir = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
    predictions: PredictionsOpt = None,
) -> None:
    """Fine-tune a task memory on a labelled dataset and write the file the service loads.

    --predictions writes the test split's predictions of the kept epoch."""
    from app.spartan.memfile import save_memory
    from app.training.datasets import few_shot as take_few_shot
    from app.training.trainer import TrainConfig, few_shot_config, predict_outputs, train_memory

    if top_k > parents:
        raise typer.BadParameter(f"--top-k {top_k} exceeds --parents {parents}")
    settings = _settings(cache_dir, backbone, threads)
    try:
        data = _load_data(
            settings.cache_dir, dataset, train_file, dev_file, test_file, glue,
            text_column, pair_column, label_column, task_type, seed,
        )  # fmt: skip
        _report_reads(data)
        if few_shot:
            data = take_few_shot(data, few_shot, seed=seed)
        encoder = _encoder(settings, serving_precision=False)
        num_layers = encoder.backbone.num_layers
        if memory_layers is not None and memory_layers > num_layers:
            raise typer.BadParameter(f"--memory-layers {memory_layers}: the backbone has {num_layers} layers")
        recipe = few_shot_config(num_layers) if few_shot else TrainConfig()
        given: dict[str, Any] = {
            name: value for name, value in (("epochs", epochs), ("lr", lr), ("eval_every", eval_every))
            if value is not None
        }  # fmt: skip
        if memory_layers is not None:  # LayerNorm copies then in every memory layer
            given |= {"memory_layers": memory_layers, "layernorm_layers": None}
        config = replace(
            recipe, batch_size=batch_size, max_length=max_length, seed=seed,
            num_parents=parents, num_children=children, top_k=top_k, temperature=temperature,
            train_layernorm=layernorm, balance_weight=balance_weight,
            **given,
        )  # fmt: skip
        typer.echo(
            f"training {data.name}: {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test, "
            f"{len(data.labels) or 'regression'} labels, backbone {settings.backbone}"
        )
        memory, result = train_memory(encoder, data, config, show_progress=not quiet)
        if predictions is not None:
            _write_predictions(predictions, memory, data.test, predict_outputs(encoder, memory, data.test))
    except SpartanError as err:
        _fail(err)
        return
    version = save_memory(memory, output)
    report_path = report or output.with_suffix(".json")
    report_path.write_text(json.dumps({**result.to_json(), "version": version}, indent=2) + "\n")
    for record in result.epochs:
        dev = record.dev or "not scored"
        typer.echo(f"epoch {record.epoch}: loss {record.train_loss:.4f} dev {dev} ({record.seconds:.1f}s)")
    layers = memory.spec.memory_layer_indices
    typer.echo(f"memories in layers {layers.start}-{layers.stop - 1} of {memory.spec.num_layers}")
    typer.echo(
        f"best epoch {result.best_epoch} ({result.seconds_to_best:.1f}s from the start); test {result.test}"
    )
    typer.echo(f"wrote {output} ({result.memory_bytes} bytes, version {version[:12]}) and {report_path}")
    if predictions is not None:
        typer.echo(f"wrote {len(data.test)} test predictions to {predictions}")


@cli.command("eval")
def eval_memory(
    memory_file: Annotated[Path, typer.Argument(help="A memory file (.safetensors).")],
    dataset: DatasetOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    test_file: Annotated[
        Path | None,
        typer.Option("--test-file", help="A file to score, every row of it (alone, or with --train-file)."),
    ] = None,
    glue: GlueOpt = None,
    text_column: TextColOpt = "text",
    pair_column: PairColOpt = None,
    label_column: LabelColOpt = "label",
    task_type: TaskTypeOpt = None,
    split: Annotated[str, typer.Option(help="train, dev or test.")] = "test",
    seed: int = 42,
    backbone: BackboneOpt = None,
    cache_dir: CacheDir = None,
    threads: Annotated[int | None, typer.Option(min=1)] = None,
    predictions: PredictionsOpt = None,
) -> None:
    """Score a memory file on a dataset split; prints the metrics, and which file and split they
    are of, as JSON.

    `--test-file F` alone scores every row of F. With --train-file and no --test-file, the test split
    is a seeded cut of the training file (the JSON's "scored" says so)."""
    from app.spartan.memfile import load_memory_file
    from app.training.datasets import load_test_file
    from app.training.trainer import predict_outputs, score_outputs

    if split not in {"train", "dev", "test"}:
        raise typer.BadParameter("--split must be train, dev or test")
    test_only = test_file is not None and dataset is None and train_file is None and glue is None
    if test_only and (split != "test" or dev_file is not None):
        raise typer.BadParameter("--test-file alone is scored as the test split (no --split, no --dev-file)")
    settings = _settings(cache_dir, backbone, threads)
    try:
        encoder = _encoder(settings, serving_precision=True)
        memory = load_memory_file(memory_file, encoder.identity())
        kind = task_type or memory.spec.task_type  # integer scores of a regression file are not classes
        if test_only:
            assert test_file is not None
            data = load_test_file(
                test_file, text_column=text_column, label_column=label_column, pair_column=pair_column,
                task_type=kind,
            )  # fmt: skip
        else:
            data = _load_data(
                settings.cache_dir, dataset, train_file, dev_file, test_file, glue,
                text_column, pair_column, label_column, kind, seed,
            )  # fmt: skip
        _report_reads(data)
        data = _memory_labelled(data, memory)
        examples = getattr(data, split)
        outputs = predict_outputs(encoder, memory, examples)
        metrics = score_outputs(memory, data, examples, outputs)
        if predictions is not None:
            _write_predictions(predictions, memory, examples, outputs)
    except SpartanError as err:
        _fail(err)
        return
    scored_file, scored = _scored_source(split, dataset, train_file, dev_file, test_file, glue, seed)
    if scored_file is not None and scored.startswith("a seeded"):
        typer.secho(f"note: scored {scored}", fg=typer.colors.YELLOW, err=True)
    result = {"memory": str(memory_file), "split": split, "file": scored_file, "scored": scored,
              "examples": len(examples), **metrics}  # fmt: skip
    if predictions is not None:
        result["predictions"] = str(predictions)
    typer.echo(json.dumps(result, indent=2))


@cli.command()
def serve(
    host: Annotated[
        str | None, typer.Option(help="Listen address (default $SPARTAN_HOST or 127.0.0.1).")
    ] = None,
    port: Annotated[
        int | None, typer.Option(min=1, max=65535, help="Port (default $SPARTAN_PORT or 8000).")
    ] = None,
    memory_dir: Annotated[
        Path | None, typer.Option(help="Store of task memories (default $SPARTAN_MEMORY_DIR or memories/).")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(min=1, help="Most rows per forward pass.")] = None,
    max_wait_ms: Annotated[
        float | None, typer.Option(min=0.0, help="Longest wait for a batch to fill.")
    ] = None,
    allow_unauthenticated_writes: Annotated[
        bool | None,
        typer.Option(
            "--allow-unauthenticated-writes/--no-allow-unauthenticated-writes",
            help="Development only: uploads and deletes without an admin key.",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    backbone: BackboneOpt = None,
    cache_dir: CacheDir = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch threads of the forward pass.")] = None,
) -> None:
    """Serve task memories over HTTP: one process, one uvicorn worker (the model is process state).

    Every option also reads its SPARTAN_* environment variable; keys are read only from the
    environment (SPARTAN_ADMIN_API_KEY, SPARTAN_PREDICT_API_KEY), never from flags: flags show in `ps`.
    """
    from app.engine.process import (
        SERVING_MALLOC_ARENAS,
        configure_torch_threads,
        limit_malloc_arenas,
        torch_threads_beside,
    )
    from app.engine.serving import serving_encoder
    from app.errors import BackboneError
    from app.http_server import serve_http
    from app.main import create_app

    overrides = {
        "host": host, "port": port, "memory_dir": memory_dir, "max_batch_size": max_batch_size,
        "max_wait_ms": max_wait_ms, "allow_unauthenticated_writes": allow_unauthenticated_writes,
        "log_level": log_level, "backbone": backbone, "cache_dir": cache_dir, "torch_threads": threads,
    }  # fmt: skip
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValueError as err:
        _fail(err)
        return
    logging.getLogger().setLevel(settings.log_level.upper())
    limit_malloc_arenas(SERVING_MALLOC_ARENAS)  # first: before the engine's and the service's threads
    try:
        encoder = serving_encoder(settings)
    except BackboneError as err:
        _fail(err)
        return
    # Once, at process start, before any pass runs: which runtime serves decides torch's share.
    configure_torch_threads(torch_threads_beside(encoder.graph, settings.torch_threads))
    serve_http(create_app(settings, encoder=encoder), settings)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request at INFO: noise in the remote commands' output (tables, JSON lines).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
