"""infinity-emb as a peer of the service load benchmark: one MiniLM classifier served by its torch or
optimum (ONNX Runtime) CPU engine from a local folder (no hub). Needs `make infinity-env`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import harness  # noqa: E402

VENV = ROOT / ".venv-infinity"
SITE = ROOT / "benchmarks" / "infinity_site"
# spartan-serve's cache folder (SPARTAN_CACHE_DIR, else the user cache dir, as app.settings finds it).
XDG = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
CACHE = Path(os.environ.get("SPARTAN_CACHE_DIR") or XDG / "spartan-serve")
MINILM = CACHE / "assets" / "all-MiniLM-L6-v2" / "model"
SERVED, LABELS = "minilm-classifier", ["negative", "positive"]
# No hub, and no telemetry (infinity posts anonymous usage statistics unless DO_NOT_TRACK is set).
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1"}


def available() -> bool:
    return (VENV / "bin" / "infinity_emb").exists()


def hub_cache(model_dir: Path) -> Path:
    """Where infinity's optimum engine looks for its optimised graph (under the hub cache, by model id)."""
    return model_dir.with_name(model_dir.name + ".hub-cache")


def optimized_dir(model_dir: Path) -> Path:
    return hub_cache(model_dir) / "infinity_onnx" / "CPUExecutionProvider"


def prepare_classifier(out_dir: Path = CACHE / "peers" / "infinity-minilm-classifier") -> Path:
    """The classifier folder (weights, tokenizer, model.onnx) and its optimised graph, built once."""
    if not (optimized_dir(out_dir) / "model_optimized.onnx").exists():
        command = [str(VENV / "bin" / "python"), __file__, "build", str(out_dir)]
        subprocess.run(command, check=True, env={**os.environ, **OFFLINE})
    return out_dir


def build(out_dir: Path) -> None:
    """(In .venv-infinity.) BertForSequenceClassification on the MiniLM asset's encoder, its pooler and
    classifier taking the sentiment memory's head (same shapes, same ops; seeded random without it).
    The answers are not the memory's (CLS token, no memory): only the cost of a pass compares. Then
    optimum's ONNX export and the optimised graph infinity cannot write itself on optimum 2."""
    import torch
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTModelForSequenceClassification, ORTOptimizer
    from optimum.onnxruntime.configuration import OptimizationConfig
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    ids = dict(enumerate(LABELS))
    model = BertForSequenceClassification.from_pretrained(
        MINILM, num_labels=2, id2label=ids, label2id={v: k for k, v in ids.items()}
    )
    if (memory := ROOT / "memories" / "sentiment.safetensors").exists():
        head = load_file(memory)
        pairs = {"bert.pooler.dense": "head.dense", "classifier": "head.out"}
        state = {f"{a}.{p}": head[f"{b}.{p}"] for a, b in pairs.items() for p in ("weight", "bias")}
        assert not model.load_state_dict(state, strict=False).unexpected_keys
    tmp = out_dir.with_name(out_dir.name + ".partial")
    for stale in (tmp, out_dir, hub_cache(out_dir)):
        shutil.rmtree(stale, ignore_errors=True)
    model.eval().save_pretrained(tmp)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(tmp)
    main_export(str(tmp), tmp, task="text-classification", device="cpu")
    tmp.rename(out_dir)
    # infinity 0.0.78's own settings (utils_optimum.optimize_model), in optimum 2's names.
    config = OptimizationConfig(optimization_level=99, enable_transformers_specific_optimizations=True)
    ORTOptimizer.from_pretrained(ORTModelForSequenceClassification.from_pretrained(out_dir)).optimize(
        optimization_config=config, save_dir=optimized_dir(out_dir), one_external_file=True
    )


class Infinity(harness.Process):
    """An infinity server's process, listening at `.url`."""

    url = ""


def start_infinity(
    model_dir: Path, engine: Literal["torch", "optimum"], threads: int, batch_size: int,
    dtype: Literal["float32", "bfloat16"] = "float32", optimize: bool = False, timeout_s: float = 300,
) -> Infinity:  # fmt: skip
    """A ready `infinity_emb v2` (one that classifies) on a free loopback port, with `.url`; dtype is
    the torch engine's, optimize optimum's (load the graph build() wrote, not the plain export)."""
    import httpx

    port = harness.free_port()
    # `--model-id .` in the folder: given a path, infinity passes optimum the ONNX file's full path, which
    # optimum-onnx matches against bare names ("Could not find any ONNX files with target file name").
    command = [
        str(VENV / "bin" / "infinity_emb"), "v2", "--model-id", ".", "--served-model-name", SERVED,
        "--engine", engine, "--device", "cpu", "--dtype", dtype, "--batch-size", str(batch_size),
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
        # As the service runs: eager torch, no result cache. No warm-up: its 514-token inputs are not
        # truncated by infinity's optimum classifier (ONNX Runtime fails).
        "--no-compile", "--no-bettertransformer", "--no-vector-disk-cache", "--no-model-warmup",
        "--no-onnx-disable-optimize" if optimize else "--onnx-disable-optimize",
    ]  # fmt: skip
    # The spartan server's thread count: torch's pool reads OMP_NUM_THREADS; ONNX Runtime's is pinned
    # by infinity_site/sitecustomize.py (infinity gives ONNX Runtime no session options).
    env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if engine == "optimum":
        hub = str(hub_cache(model_dir))
        env |= {"PYTHONPATH": str(SITE), "ORT_INTRA_OP_THREADS": str(threads)}
        env |= {"HF_HUB_CACHE": hub, "HUGGINGFACE_HUB_CACHE": hub}
    log = CACHE / "peers" / "logs" / f"infinity-{engine}-{port}.log"
    server = Infinity(command, log, env, cwd=model_dir)
    server.url = f"http://127.0.0.1:{port}"
    server.start()

    def ready() -> bool:
        server.check_alive()
        return httpx.post(f"{server.url}/classify", json=classify_body(["ready"]), timeout=30).is_success

    try:
        harness.wait_until(ready, timeout_s, f"infinity ({engine}) at {server.url} ready", every_s=0.5)
    except BaseException:
        server.stop()
        raise
    return server


def classify_body(texts: list[str]) -> dict[str, Any]:
    """POST /classify's JSON; the answer's "data" has one list of {"label", "score"} per input."""
    return {"model": SERVED, "input": texts}


def classify(client: Any, texts: list[str]) -> list[list[dict[str, Any]]]:
    """With an httpx.Client whose base_url is the server's url."""
    response = client.post("/classify", json=classify_body(texts))
    response.raise_for_status()
    return list(response.json()["data"])


if __name__ == "__main__" and sys.argv[1:2] == ["build"]:
    build(Path(sys.argv[2]))
