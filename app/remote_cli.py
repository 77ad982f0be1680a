"""Remote commands: `spartan tasks ...`, `spartan predict ...` and `spartan jobs ...` against a running
service, through app.client (httpx only: no torch is loaded for them).

The service's address is `--url` (default $SPARTAN_URL, else http://127.0.0.1:8000); keys come only
from the environment (SPARTAN_ADMIN_API_KEY for uploads and deletes, SPARTAN_PREDICT_API_KEY for the
rest), never from flags: flags show in `ps`. Exit codes:
  0  done
  1  the service refused the request (a 4xx: unknown task, invalid input or file, conflict, key, ...)
  2  usage: wrong options or arguments, an input file that cannot be read
  3  the service is unreachable, or answered 5xx (not ready, overloaded beyond the retries, ...)
A 429 counts as 3 too: the client has already waited out its Retry-After as often as it may.
`spartan jobs follow` (and `submit --follow`) exits 0 when the job succeeded, 1 when it failed or was
cancelled.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from app.client import DEFAULT_URL, Client, ServiceError, ServiceUnreachable, TaskOut
from app.client.models import TrainingJobOut

EXIT_REFUSED, EXIT_USAGE, EXIT_UNAVAILABLE = 1, 2, 3

UrlOpt = Annotated[
    str, typer.Option("--url", envvar="SPARTAN_URL", help="The service (default $SPARTAN_URL or local).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="JSON output, for scripts.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.1, help="Seconds per HTTP request.")]
TaskArg = Annotated[str, typer.Argument(help="Task name.")]

tasks_app = typer.Typer(no_args_is_help=True, help="Task memories on a running service.")
jobs_app = typer.Typer(no_args_is_help=True, help="Training jobs on a running service.")
JobArg = Annotated[str, typer.Argument(help="Training job id.")]


def register(cli: typer.Typer) -> None:
    """Add the remote commands to the `spartan` command line."""
    cli.add_typer(tasks_app, name="tasks")
    cli.add_typer(jobs_app, name="jobs")
    cli.command("predict")(predict)


def _env_key(name: str) -> str | None:
    return os.environ.get(name) or None


@contextmanager
def _service(url: str, timeout_s: float) -> Iterator[Client]:
    """A client of the service; its errors become a message on stderr and the documented exit code."""
    try:
        with Client(
            url,
            admin_key=_env_key("SPARTAN_ADMIN_API_KEY"),
            predict_key=_env_key("SPARTAN_PREDICT_API_KEY"),
            timeout_s=timeout_s,
        ) as client:
            yield client
    except ServiceUnreachable as err:
        typer.secho(f"error: service unreachable: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_UNAVAILABLE) from None
    except ServiceError as err:
        typer.secho(f"error: {err.status} {err.type}: {err.message}", fg=typer.colors.RED, err=True)
        refused = err.status < 500 and err.status != 429
        raise typer.Exit(EXIT_REFUSED if refused else EXIT_UNAVAILABLE) from None


def _print_json(value: BaseModel | dict[str, Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    typer.echo(json.dumps(data, indent=2))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _short(version: str | None) -> str | None:
    return None if version is None else version[:12]


@tasks_app.command("list")
def list_tasks(url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0) -> None:
    """Every task in the service's store, resident or not."""
    with _service(url, timeout) as client:
        found = client.list_tasks()
    if as_json:
        _print_json(found)
        return
    _table(
        ["TASK", "STATUS", "TYPE", "LABELS", "VERSION", "FILE BYTES", "PINNED", "ERROR"],
        [
            [t.name, t.status, t.task_type, len(t.labels), _short(t.version), t.file_bytes, t.pinned, t.error]
            for t in found.tasks
        ],
    )
    typer.echo(f"{len(found.tasks)} tasks, {found.loaded} loaded ({found.loaded_bytes} bytes)")


def _describe(task: TaskOut) -> None:
    _table(["FIELD", "VALUE"], [[key, value] for key, value in task.model_dump(mode="json").items()])


@tasks_app.command("show")
def show(
    task: TaskArg, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0
) -> None:
    """One task: status, version, labels, sizes, request counts."""
    with _service(url, timeout) as client:
        found = client.get_task(task)
    _print_json(found) if as_json else _describe(found)


@tasks_app.command("upload")
def upload(
    task: TaskArg,
    memory_file: Annotated[
        Path, typer.Argument(help="A memory file (.safetensors), as `spartan train` writes.")
    ],
    replace: Annotated[bool, typer.Option("--replace", help="Replace the task if it exists.")] = False,
    if_match: Annotated[
        str | None, typer.Option("--if-match", help="Replace only if the current version is this sha256.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Upload (create, or replace) a task memory; needs SPARTAN_ADMIN_API_KEY."""
    try:
        data = memory_file.read_bytes()
    except OSError as err:
        raise typer.BadParameter(
            f"cannot read {memory_file}: {err.strerror}", param_hint="MEMORY_FILE"
        ) from None
    with _service(url, timeout) as client:
        done = client.upload(task, data, replace=replace, if_match=if_match)
    if as_json:
        _print_json({"created": done.created, "task": done.task.model_dump(mode="json")})
        return
    typer.echo(f"{'created' if done.created else 'replaced'} {task}: version {done.task.version}")


@tasks_app.command("delete")
def delete(task: TaskArg, url: UrlOpt = DEFAULT_URL, timeout: TimeoutOpt = 60.0) -> None:
    """Delete a task's memory; needs SPARTAN_ADMIN_API_KEY."""
    with _service(url, timeout) as client:
        client.delete(task)
    typer.echo(f"deleted {task}")


@tasks_app.command("routing")
def routing(
    task: TaskArg, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0
) -> None:
    """Per layer, how evenly the task's parents are used and how much they say about the label."""
    with _service(url, timeout) as client:
        found = client.routing(task)
    if as_json:
        _print_json(found)
        return
    typer.echo(
        f"{found.task} version {_short(found.version)}: {found.rows} inputs, {found.tokens} tokens, "
        f"{found.num_parents} parents (top {found.top_k}); "
        f"label entropy {found.label_entropy_bits:.3f} bits, "
        f"ceiling {found.mutual_information_ceiling_bits:.3f} bits"
    )
    _table(
        ["LAYER", "PARENT ENTROPY BITS", "MUTUAL INFORMATION BITS"],
        [[x.layer, f"{x.parent_entropy_bits:.3f}", f"{x.mutual_information_bits:.3f}"] for x in found.layers],
    )


def _read_inputs(texts: list[str] | None, file: Path | None) -> list[str]:
    if texts and file is not None:
        raise typer.BadParameter("give TEXT arguments or --file, not both")
    if texts:
        return texts
    try:
        lines = sys.stdin.read() if file is None or str(file) == "-" else file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise typer.BadParameter(f"cannot read the inputs: {err}", param_hint="--file") from None
    return [line for line in lines.splitlines() if line.strip()]


def _as_pair(line: str) -> tuple[str, str]:
    text, tab, second = line.partition("\t")
    if not tab:
        raise typer.BadParameter(f"--pairs: no tab in {line[:60]!r}")
    return text, second


def predict(
    task: TaskArg,
    texts: Annotated[list[str] | None, typer.Argument(help="Texts (default: --file, or stdin).")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="One input per line ('-' = stdin).")
    ] = None,
    pairs: Annotated[bool, typer.Option("--pairs", help="Each input is 'text<TAB>second text'.")] = False,
    all_scores: Annotated[bool, typer.Option("--all-scores", help="Every label's probability.")] = False,
    with_routing: Annotated[
        bool, typer.Option("--routing", help="The parents that fired, per layer.")
    ] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Inputs per request.")] = 32,
    url: UrlOpt = DEFAULT_URL,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Predict with a task's memory: one JSON line per input, in order (input, label, score, ...)."""
    lines = _read_inputs(texts, file)
    if not lines:
        raise typer.BadParameter("no inputs: give TEXT arguments, --file, or lines on stdin")
    inputs: list[str | tuple[str, str]] = [_as_pair(line) for line in lines] if pairs else list(lines)
    with _service(url, timeout) as client:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            answer = client.predict(task, chunk, return_all_scores=all_scores, return_routing=with_routing)
            for item, prediction in zip(chunk, answer.predictions, strict=True):
                fields = prediction.model_dump(mode="json", exclude_none=True)
                line = {"input": item if isinstance(item, str) else list(item), **fields}
                typer.echo(json.dumps({**line, "version": answer.version}))


# ------------------------------------------------------------------------------------ training jobs


def _metric(metrics: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in metrics.items()) or "-"


def _progress_line(job: TrainingJobOut) -> str:
    """One line per change of a followed job."""
    if job.state == "queued":
        return f"{job.id} queued ({job.examples.get('train', 0)} training rows)"
    if job.state == "running":
        p = job.progress
        loss = f" loss {p.loss:.4f}" if p.loss is not None else ""
        eta = f" eta {p.eta_s:.0f}s" if p.eta_s is not None else ""
        dev = f" dev {_metric(job.epochs[-1].dev)}" if job.epochs else ""
        return f"{job.id} running epoch {p.epoch}/{p.epochs} step {p.step}/{p.steps}{loss}{dev}{eta}"
    if job.state == "succeeded":
        return (
            f"{job.id} succeeded: task {job.task} version {job.version}; best epoch {job.best_epoch}, "
            f"dev {_metric(job.dev)}, test {_metric(job.test)}"
        )
    return f"{job.id} {job.state}: {job.error}"


def _follow(client: Client, job_id: str, as_json: bool) -> TrainingJobOut:
    last, shown = client.get_job(job_id), ""
    for last in client.follow_job(job_id):
        line = json.dumps(last.model_dump(mode="json")) if as_json else _progress_line(last)
        if line != shown:
            typer.echo(line)
            shown = line
    return last


def _job_exit(job: TrainingJobOut) -> None:
    if job.state != "succeeded":
        raise typer.Exit(EXIT_REFUSED)


@jobs_app.command("submit")
def submit_job(
    task: TaskArg,
    train_file: Annotated[Path, typer.Argument(help="Training rows: a .jsonl, .csv or .tsv file.")],
    dev_file: Annotated[
        Path | None, typer.Option(help="Dev rows (default: cut from the training rows).")
    ] = None,
    test_file: Annotated[
        Path | None, typer.Option(help="Test rows (default: cut from the training rows).")
    ] = None,
    few_shot: Annotated[int | None, typer.Option(min=1, help="Train on N rows (stratified).")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: the few-shot recipe's.")] = None,
    lr: Annotated[float | None, typer.Option(min=0.0, help="Default: the few-shot recipe's.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_length: Annotated[int | None, typer.Option(min=8)] = None,
    parents: Annotated[int | None, typer.Option(min=1, help="E: parents per layer.")] = None,
    children: Annotated[int | None, typer.Option(min=1, help="C: children per parent.")] = None,
    top_k: Annotated[int | None, typer.Option(min=1, help="k: parents used per token.")] = None,
    temperature: Annotated[float | None, typer.Option(help="T: child softmax temperature.")] = None,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    dev_fraction: Annotated[float | None, typer.Option(help="Cut for dev when no --dev-file (0.1).")] = None,
    test_fraction: Annotated[
        float | None, typer.Option(help="Cut for test when no --test-file (0.1).")
    ] = None,
    task_type: Annotated[
        str | None, typer.Option(help="classification or regression (default: inferred).")
    ] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Replace the task if it exists.")] = False,
    if_match: Annotated[
        str | None,
        typer.Option("--if-match", help="Install only if the task's version is still this sha256."),
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", help="Follow the job until it ends.")] = False,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 120.0,
) -> None:
    """Train a task memory on the service from labelled rows (columns text, label, optional text_pair);
    needs SPARTAN_ADMIN_API_KEY. Prints the job's id (with --follow, its progress until it ends)."""
    for path, hint in ((train_file, "TRAIN_FILE"), (dev_file, "--dev-file"), (test_file, "--test-file")):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"cannot read {path}", param_hint=hint)
    options = {
        "few_shot": few_shot, "epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
        "num_parents": parents, "num_children": children, "top_k": top_k, "temperature": temperature,
        "seed": seed, "dev_fraction": dev_fraction, "test_fraction": test_fraction, "task_type": task_type,
    }  # fmt: skip
    with _service(url, timeout) as client:
        job = client.submit_job(
            task, train_file, dev=dev_file, test=test_file, replace=replace, if_match=if_match, **options
        )
        if as_json and not follow:
            _print_json(job)
        elif not follow:
            typer.echo(f"{job.id} queued: task {task}, {job.examples.get('train', 0)} training rows")
        if follow:
            job = _follow(client, job.id, as_json)
    if follow:
        _job_exit(job)


@jobs_app.command("show")
def show_job(
    job_id: JobArg, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0
) -> None:
    """One job: state, progress, dev score per epoch, final metrics, the version it installed."""
    with _service(url, timeout) as client:
        job = client.get_job(job_id)
    if as_json:
        _print_json(job)
        return
    typer.echo(_progress_line(job))
    _table(
        ["EPOCH", "TRAIN LOSS", "DEV", "SECONDS"],
        [[e.epoch, f"{e.train_loss:.4f}", _metric(e.dev), f"{e.seconds:.1f}"] for e in job.epochs],
    )


@jobs_app.command("list")
def list_jobs(
    task: Annotated[str | None, typer.Option(help="Only this task's jobs.")] = None,
    state: Annotated[str | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500)] = 50,
    url: UrlOpt = DEFAULT_URL,
    as_json: JsonOpt = False,
    timeout: TimeoutOpt = 60.0,
) -> None:
    """Training jobs of every replica, newest first."""
    with _service(url, timeout) as client:
        found = client.list_jobs(task=task, state=state, limit=limit)
    if as_json:
        _print_json(found)
        return
    _table(
        ["JOB", "TASK", "STATE", "EPOCH", "DEV", "VERSION", "REPLICA", "ERROR"],
        [
            [j.id, j.task, j.state, f"{j.progress.epoch}/{j.progress.epochs}", _metric(j.dev),
             _short(j.version), j.replica, j.error]
            for j in found.jobs
        ],
    )  # fmt: skip


@jobs_app.command("cancel")
def cancel_job(
    job_id: JobArg, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0
) -> None:
    """Cancel a queued or running job (nothing is installed); needs SPARTAN_ADMIN_API_KEY."""
    with _service(url, timeout) as client:
        job = client.cancel_job(job_id)
    if as_json:
        _print_json(job)
        return
    typer.echo(
        _progress_line(job) if job.state == "cancelled" else f"{job.id}: asked to stop ({job.replica})"
    )


@jobs_app.command("follow")
def follow_job(
    job_id: JobArg, url: UrlOpt = DEFAULT_URL, as_json: JsonOpt = False, timeout: TimeoutOpt = 60.0
) -> None:
    """Print a job's progress until it ends; exit 0 if it succeeded, 1 if it failed or was cancelled."""
    with _service(url, timeout) as client:
        job = _follow(client, job_id, as_json)
    _job_exit(job)
