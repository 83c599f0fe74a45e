"""Loading models and tensors safely: model specs, weights files, trust rules.

A MODEL spec is one of

* ``package.module:callable`` or ``path/to/file.py:callable`` -- the callable is imported and
  called with the ``--arg key=value`` pairs (:mod:`~normswap.load.specs`);
* ``path/to/model.pt`` (``.pth``, ``.bin``, ``.ckpt``) -- a whole pickled ``nn.Module``, refused
  unless ``trust_pickle`` (``--trust-pickle``) is given (:mod:`~normswap.load.pickles`);
* ``None`` -- the bundled digits model (:data:`DEFAULT_MODEL_SPEC`).

Weights files are read without executing code (:mod:`~normswap.load.weights`), sample files too
(:mod:`~normswap.load.tensors`); a model built with random weights is detected and noted
(:mod:`~normswap.load.random_init`).  Every failure caused by the input raises
:class:`~normswap.errors.InputError` with a one-line message saying what is wrong and what to do.
torchvision and timm are never imported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Re-exported: every name load.py had before the split stays importable from normswap.load.
from .common import (  # noqa: F401
    _SHOW_KEYS,
    MODEL_FILE_SUFFIXES,
    TORCH_SUFFIXES,
    _describe_exc,
    _error,
    _existing_file,
    _has_suffix,
    _natural_key,
    _one_line,
    _show,
)
from .pickles import (  # noqa: F401
    _DANGEROUS_MODULES,
    _DATA_MODULES,
    _TORCHSCRIPT_MSG,
    _is_dangerous_global,
    _is_torchscript_zip,
    _pickle_globals,
    _pickle_refused,
    _pickle_stream_globals,
    _quiet_torch_load,
    _refused_global,
    _refused_global_in_message,
    _torch_load_error,
    _torch_load_weights_only,
    _weights_only_allowed,
    load_pickled_module,
)
from .random_init import PRETRAINED_ARGS, RANDOM_INIT_NOTE, _pretrained_arg, _rebuilds_differently  # noqa: F401
from .specs import (  # noqa: F401
    _build,
    _import_file,
    _import_module,
    _is_file_spec,
    _parse_value,
    _split_spec,
    parse_kv_args,
    resolve_callable,
)
from .tensors import (  # noqa: F401
    _check_samples,
    _from_numpy,
    _one_or_tuple,
    _read_safetensors,
    load_tensor_file,
)
from .weights import (  # noqa: F401
    _MAX_UNWRAP,
    CHECKPOINT_KEYS,
    EMA_CHECKPOINT_KEYS,
    STRIPPED_PREFIXES,
    _dot_prefixes,
    _key_diff,
    _rekey_by_prefix,
    _strip_prefixes,
    _unwrap_checkpoint,
    apply_state_dict,
    load_state_dict_file,
)

__all__ = [
    "CHECKPOINT_KEYS",
    "DEFAULT_MODEL_SPEC",
    "EMA_CHECKPOINT_KEYS",
    "LoadedModel",
    "PRETRAINED_ARGS",
    "RANDOM_INIT_NOTE",
    "apply_state_dict",
    "load_model",
    "load_pickled_module",
    "load_state_dict_file",
    "load_tensor_file",
    "parse_kv_args",
    "resolve_callable",
]

DEFAULT_MODEL_SPEC = "normswap.models.digits:digits_resnet"
"""The model loaded when no MODEL spec is given (resolved lazily, on each call)."""


@dataclass
class LoadedModel:
    """A loaded model (in ``eval()`` mode) and how it was obtained."""

    model: torch.nn.Module
    spec: str | None
    args: dict[str, Any]
    weights: str | None
    input_shape: tuple[int, ...] | None
    notes: list[str] = field(default_factory=list)
    #: True when the weights are a random initialisation: the spec was built without ``weights``
    #: and without a pretrained argument, and building it again under another seed gave other
    #: values (see :func:`load_model`).  Such a model cannot match any earlier export.
    random_init: bool = False


def _input_shape(model: torch.nn.Module) -> tuple[int, ...] | None:
    """``model.normswap_input_shape``, else ``(1, *input_size)`` from timm's config, else None."""
    shape = getattr(model, "normswap_input_shape", None)
    if isinstance(shape, (tuple, list)) and shape and all(isinstance(d, int) for d in shape):
        return tuple(int(d) for d in shape)
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        size = cfg.get("input_size") if isinstance(cfg, Mapping) else None
        if isinstance(size, (tuple, list)) and size and all(isinstance(d, int) for d in size):
            return (1, *(int(d) for d in size))
    return None


def load_model(
    spec: str | None = None,
    *,
    args: Mapping[str, Any] | None = None,
    weights: str | Path | None = None,
    trust_pickle: bool = False,
    strict: bool = True,
    detect_random_init: bool = True,
) -> LoadedModel:
    """Build or load the model named by ``spec``, apply ``weights``, put it in ``eval()``.

    See the module docstring for the spec forms.  ``args`` go to the spec's callable (not allowed
    with a pickled model file).  ``weights`` is read by :func:`load_state_dict_file` and applied
    by :func:`apply_state_dict` (``strict``).  ``trust_pickle`` allows unpickling a model file
    (and a weights file that holds pickled objects).

    Random weights are never silent: when a spec is built without ``weights`` and without a
    pretrained argument (:data:`PRETRAINED_ARGS`), it is built a second time under another seed
    (``detect_random_init``, on by default) and the two compared.  Different values mean the
    builder draws its weights at random: ``random_init`` is set and :data:`RANDOM_INIT_NOTE` added
    to ``notes``.  Equal values mean it loads (or computes) them, like the bundled default model,
    which loads its shipped weights.  This certainty costs one more build -- a few milliseconds
    for the digits model, about 0.5 s for torchvision's resnet50, seconds for the largest timm
    models -- and never a download (a builder given a pretrained argument is not rebuilt).  With
    ``detect_random_init=False`` the check is skipped and ``random_init`` is True exactly when no
    weights and no pretrained argument were given (a guess: it cannot see builders that load
    their own weights).  A pickled whole-model file is never random.
    """
    kwargs = dict(args or {})
    notes: list[str] = []
    target = DEFAULT_MODEL_SPEC if spec is None else spec
    if not isinstance(target, str) or not target.strip():
        raise _error("MODEL spec is empty; write package.module:function or path/to/file.py:function")
    target = target.strip()
    looks_like_file = ":" not in target.replace(":\\", "").replace(":/", "")
    random_init = False
    if looks_like_file and _has_suffix(Path(target), MODEL_FILE_SUFFIXES):
        if kwargs:
            raise _error(
                f"--arg values ({', '.join(kwargs)}) apply only to pkg.mod:fn / file.py:fn specs, "
                f"not to the pickled model file '{target}'; drop them"
            )
        model = load_pickled_module(target, trust_pickle=trust_pickle)
        notes.append(f"unpickled the whole model from '{target}' (--trust-pickle)")
    elif looks_like_file and _has_suffix(Path(target), (".safetensors",)):
        raise _error(
            f"MODEL '{target}' is a weights file, not a model; give the architecture as MODEL "
            "(pkg.mod:fn or file.py:fn) and pass this file as --weights"
        )
    elif looks_like_file and _has_suffix(Path(target), (".onnx",)):
        raise _error(
            f"MODEL '{target}' is an ONNX file; normswap rewrites PyTorch models: give the "
            "PyTorch model as pkg.mod:fn or file.py:fn"
        )
    else:
        model = _build(target, kwargs)
        if weights is None and _pretrained_arg(kwargs) is None:
            random_init = (
                bool(_rebuilds_differently(target, kwargs, model)) if detect_random_init else True
            )
    if weights is not None:
        sd, wnotes = load_state_dict_file(weights, trust_pickle=trust_pickle)
        notes.extend(wnotes)
        notes.extend(apply_state_dict(model, sd, strict=strict))
    if random_init:
        notes.append(RANDOM_INIT_NOTE)
    model.eval()
    return LoadedModel(
        model=model,
        spec=spec,
        args=kwargs,
        weights=None if weights is None else str(weights),
        input_shape=_input_shape(model),
        notes=notes,
        random_init=random_init,
    )
