"""Start-up hook of the infinity server's process only (benchmarks/peer_infinity.py puts this folder
first on its PYTHONPATH). infinity-emb 0.0.78 gives ONNX Runtime no session options, so the optimum
engine's intra-op pool takes every core whatever OMP_NUM_THREADS says; this pins it to
ORT_INTRA_OP_THREADS, as OMP_NUM_THREADS pins the torch engine's pool."""

import os
from typing import Any

_THREADS = int(os.environ.get("ORT_INTRA_OP_THREADS", "0") or 0)

if _THREADS > 0:
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        _init = onnxruntime.InferenceSession.__init__

        def _pinned_init(
            self: Any, path_or_bytes: Any, sess_options: Any = None, *args: Any, **kwargs: Any
        ) -> None:
            options = sess_options if sess_options is not None else onnxruntime.SessionOptions()
            options.intra_op_num_threads = _THREADS
            _init(self, path_or_bytes, options, *args, **kwargs)

        onnxruntime.InferenceSession.__init__ = _pinned_init
