"""onnxruntime on CPU: fresh sessions (:func:`make_session`), a small per-file-version session
cache, positional input feeds and :func:`run_onnxruntime`."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from normswap.errors import InputError, NormswapError, first_line

from .inputs import _as_tuple
from .outputs import _to_numpy

_OPT_LEVELS = {"all": "ORT_ENABLE_ALL", "extended": "ORT_ENABLE_EXTENDED", "basic": "ORT_ENABLE_BASIC", "disable": "ORT_DISABLE_ALL"}
_SESSION_CACHE: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_SESSION_CACHE_SIZE = 4
_SESSION_LOCK = threading.Lock()

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}


def make_session(path: str | os.PathLike[str], *, threads: int | None = None, optimization: str = "all") -> Any:
    """A fresh CPU onnxruntime InferenceSession (no cache); errors become one-line NormswapErrors."""
    import onnxruntime as ort

    if optimization not in _OPT_LEVELS:
        raise InputError(f"unknown onnxruntime optimization {optimization!r}; use one of {', '.join(_OPT_LEVELS)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _OPT_LEVELS[optimization])
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise NormswapError(f"onnxruntime cannot load {path}: {first_line(e)}; re-export it (check --opset)") from e


def _session(path: str | os.PathLike[str], threads: int | None, optimization: str) -> Any:
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise InputError(f"ONNX file {path} cannot be read ({e.strerror}); check the path") from e
    key = (str(p), st.st_mtime_ns, st.st_size, threads, optimization)
    with _SESSION_LOCK:
        sess = _SESSION_CACHE.get(key)
        if sess is not None:
            _SESSION_CACHE.move_to_end(key)
            return sess
    sess = make_session(p, threads=threads, optimization=optimization)
    with _SESSION_LOCK:
        _SESSION_CACHE[key] = sess
        while len(_SESSION_CACHE) > _SESSION_CACHE_SIZE:
            _SESSION_CACHE.popitem(last=False)
    return sess


def clear_session_cache() -> None:
    """Forget every cached onnxruntime session."""
    with _SESSION_LOCK:
        _SESSION_CACHE.clear()


def session_feed(sess: Any, inputs: Sequence[Any]) -> dict[str, np.ndarray]:
    """Map positional inputs onto the session's input names, casting floats to the declared type."""
    metas = sess.get_inputs()
    # a list of images (a detector's input) is one ONNX input per image, in order
    inputs = [leaf for x in inputs for leaf in (x if isinstance(x, (list, tuple)) else [x])]
    if len(metas) != len(inputs):
        raise InputError(
            f"the ONNX model takes {len(metas)} input(s) ({', '.join(m.name for m in metas)}) but {len(inputs)} were given; "
            "match --input-shape to the model's inputs"
        )
    feed: dict[str, np.ndarray] = {}
    for meta, x in zip(metas, inputs):
        a = np.ascontiguousarray(_to_numpy(x))
        want = _ORT_TYPES.get(meta.type)
        if want is not None and a.dtype != want and np.issubdtype(a.dtype, np.floating) and np.issubdtype(want, np.floating):
            a = a.astype(want)
        feed[meta.name] = a
    return feed


def run_onnxruntime(
    path: str | os.PathLike[str],
    inputs: Sequence[Any],
    *,
    threads: int | None = None,
    optimization: str = "all",
) -> list[np.ndarray]:
    """Run an ONNX file on CPU onnxruntime; the session is cached per (file version, settings).

    ``optimization`` is onnxruntime's graph optimization level: "all", "extended", "basic" or
    "disable". Inputs are matched to the model's inputs by position.
    """
    sess = _session(path, threads, optimization)
    feed = session_feed(sess, _as_tuple(inputs))
    try:
        return list(sess.run(None, feed))
    except Exception as e:
        raise NormswapError(f"onnxruntime failed running {path}: {first_line(e)}; check the input shapes") from e
