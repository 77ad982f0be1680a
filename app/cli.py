"""The `spartan` command line: fetch assets, train and score task memories, serve them."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from app.errors import SpartanError
from app.remote_cli import register as register_remote_commands
from app.settings import Settings

if TYPE_CHECKING:
    from app.engine.encoder import SpartanEncoder
    from app.training.datasets import TaskData

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


def _encoder(settings: Settings, *, serving_precision: bool) -> SpartanEncoder:
    """The encoder of this command: `eval` scores at the service's precision (so its labels are the
    served ones); `train` always runs the backbone in float32 (gradients flow through it)."""
    from app.engine.backbone import load_backbone, resolve_precision
    from app.engine.encoder import SpartanEncoder
    from app.engine.process import configure_torch_threads

    configure_torch_threads(settings.torch_threads)  # this command is the process: its start
    precision = resolve_precision(settings.precision) if serving_precision else "fp32"
    return SpartanEncoder(load_backbone(settings.backbone, settings.cache_dir, precision=precision))


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
    few_shot: Annotated[int | None, typer.Option(min=1, help="Train on N examples only (few-shot).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 3,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
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
) -> None:
    """Fine-tune a task memory on a labelled dataset and write the file the service loads."""
    from app.spartan.memfile import save_memory
    from app.training.datasets import few_shot as take_few_shot
    from app.training.trainer import TrainConfig, train_memory

    if top_k > parents:
        raise typer.BadParameter(f"--top-k {top_k} exceeds --parents {parents}")
    settings = _settings(cache_dir, backbone, threads)
    try:
        data = _load_data(
            settings.cache_dir, dataset, train_file, dev_file, test_file, glue,
            text_column, pair_column, label_column, task_type, seed,
        )  # fmt: skip
        if few_shot:
            data = take_few_shot(data, few_shot, seed=seed)
        encoder = _encoder(settings, serving_precision=False)
        config = TrainConfig(
            epochs=epochs, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
            num_parents=parents, num_children=children, top_k=top_k, temperature=temperature,
            train_layernorm=layernorm, balance_weight=balance_weight,
        )  # fmt: skip
        typer.echo(
            f"training {data.name}: {len(data.train)} train / {len(data.dev)} dev / {len(data.test)} test, "
            f"{len(data.labels) or 'regression'} labels, backbone {settings.backbone}"
        )
        memory, result = train_memory(encoder, data, config, show_progress=not quiet)
    except SpartanError as err:
        _fail(err)
        return
    version = save_memory(memory, output)
    report_path = report or output.with_suffix(".json")
    report_path.write_text(json.dumps({**result.to_json(), "version": version}, indent=2) + "\n")
    for record in result.epochs:
        typer.echo(
            f"epoch {record.epoch}: loss {record.train_loss:.4f} dev {record.dev} ({record.seconds:.1f}s)"
        )
    typer.echo(f"best epoch {result.best_epoch}; test {result.test}")
    typer.echo(f"wrote {output} ({result.memory_bytes} bytes, version {version[:12]}) and {report_path}")


@cli.command("eval")
def eval_memory(
    memory_file: Annotated[Path, typer.Argument(help="A memory file (.safetensors).")],
    dataset: DatasetOpt = None,
    train_file: TrainFileOpt = None,
    dev_file: DevFileOpt = None,
    test_file: TestFileOpt = None,
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
) -> None:
    """Score a memory file on a dataset split; prints the metrics as JSON."""
    from app.spartan.memfile import load_memory_file
    from app.training.trainer import evaluate

    if split not in {"train", "dev", "test"}:
        raise typer.BadParameter("--split must be train, dev or test")
    settings = _settings(cache_dir, backbone, threads)
    try:
        data = _load_data(
            settings.cache_dir, dataset, train_file, dev_file, test_file, glue,
            text_column, pair_column, label_column, task_type, seed,
        )  # fmt: skip
        encoder = _encoder(settings, serving_precision=True)
        memory = load_memory_file(memory_file, encoder.identity())
        if memory.spec.labels != data.labels:
            _fail(SpartanError(f"memory labels {list(memory.spec.labels)} differ from the dataset's"))
        metrics = evaluate(encoder, memory, data, getattr(data, split))
    except SpartanError as err:
        _fail(err)
        return
    typer.echo(json.dumps({"memory": str(memory_file), "split": split, "examples": len(getattr(data, split)),
                           **metrics}, indent=2))  # fmt: skip


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
    from app.engine.process import configure_torch_threads
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
    configure_torch_threads(settings.torch_threads)  # once, at process start, before any torch work
    serve_http(create_app(settings), settings)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cli()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
