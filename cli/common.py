"""Shared CLI pieces: options, the error boundary, input shapes.  The CLI calls only the public API."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.text import Text

from normswap.errors import InputError, NormswapError

# Piped output (CI logs, files) gets a readable width instead of rich's 80-column fallback.
_WIDTH = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "140"))
console = Console(width=_WIDTH)
err_console = Console(stderr=True, width=_WIDTH, soft_wrap=True)  # an error stays one line

# the error boundary's codes; the verdicts' codes (0, 3, 4) are normswap.pipeline.EXIT_CODES
EXIT_INTERNAL, EXIT_BAD_INPUT = 1, 2

F = TypeVar("F", bound=Callable[..., Any])

# ---- options shared by commands ------------------------------------------------------------
ModelArg = Annotated[
    Optional[str],
    typer.Argument(
        help="package.module:callable, path/to/file.py:callable, or a pickled model file (needs --trust-pickle). "
        "Omit for the bundled digits ResNet.",
        show_default=False,
    ),
]
ArgOpt = Annotated[list[str], typer.Option("--arg", "-a", help="key=value keyword argument for the model callable (repeatable; values parsed as Python literals).")]
WeightsOpt = Annotated[Optional[str], typer.Option("--weights", "-w", help="state dict: .safetensors or .pt/.pth/.bin (loaded weights-only).")]
TrustOpt = Annotated[bool, typer.Option("--trust-pickle", help="allow loading a pickled file that can execute code. Only for files you trust.")]
NoStrictOpt = Annotated[bool, typer.Option("--no-strict", help="load only the weights that fit; report the missing/unexpected keys.")]
ShapeOpt = Annotated[Optional[str], typer.Option("--input-shape", "-s", help="example input shape, e.g. 1,3,224,224 (default: the model's own, else 1,3,224,224).")]
SamplesOpt = Annotated[Optional[str], typer.Option("--samples", help="extra parity inputs: a tensor [N, ...] in .pt/.npy/.safetensors (convert: also a folder of images).")]
AtolOpt = Annotated[float, typer.Option("--atol", help="parity: absolute tolerance (pass when max|err| <= atol + rtol * max|reference|).")]
RtolOpt = Annotated[float, typer.Option("--rtol", help="parity: tolerance relative to the output's scale.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON on stdout instead of tables.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="show the full traceback on errors.")]


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' or '1x3x224x224' → (1, 3, 224, 224); one clear error otherwise."""
    parts = [p.strip() for p in text.replace("x", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InputError(f"--input-shape '{text}' is not a list of integers; write it like 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise InputError(f"--input-shape '{text}' needs positive dimensions, batch first, e.g. 1,3,224,224")
    return shape


def validate_options(*, input_shape: str | None = None, runtime: dict[str, Any] | None = None, **values: Any) -> None:
    """The numeric options (:func:`normswap.validate.options`), ``--input-shape`` and the device, precision
    and image-folder options (:func:`normswap.validate.runtime_options`), checked before any work (exit 2
    naming the option)."""
    from normswap import validate

    validate.options(**values)
    if runtime is not None:
        validate.runtime_options(**runtime)
    if input_shape is not None:
        parse_shape(input_shape)


def progress_for(json_out: bool) -> Any:
    """Live progress on a terminal only: none for --json, pipes, CI logs or a silenced torchrun rank."""
    from normswap.progress import NullProgress, RichProgress

    if json_out or console.quiet or not console.is_terminal:
        return NullProgress()
    return RichProgress(err_console)


def debug_enabled(flag: bool) -> bool:
    return flag or os.environ.get("NORMSWAP_DEBUG", "") not in ("", "0")


def guarded(fn: F) -> F:
    """The error boundary: a NormswapError becomes one line on stderr and its exit code; anything
    unexpected becomes one line and exit 1; ``--debug`` (or NORMSWAP_DEBUG=1) shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*a: Any, **kw: Any) -> Any:
        debug = debug_enabled(bool(kw.get("debug", False)))
        try:
            return fn(*a, **kw)
        except typer.Exit:
            raise
        except NormswapError as e:
            if debug:
                traceback.print_exc()
            err_console.print(Text.assemble(("error: ", "bold red"), str(e)), highlight=False)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]; no output file was left half-written")
            raise typer.Exit(130) from None
        except OSError as e:  # a path the user gave cannot be read or written: theirs to fix
            if debug:
                traceback.print_exc()
            if e.filename is None and not isinstance(e, (PermissionError, FileNotFoundError)):
                return _internal(e)
            where = f" {e.filename}" if e.filename is not None else ""
            err_console.print(Text.assemble(("error: ", "bold red"), f"cannot access{where}: {e.strerror or e}; check the path and its permissions"),
                              highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except MemoryError:
            err_console.print(Text.assemble(("error: ", "bold red"), "out of memory; pass a smaller --input-shape or batch"), highlight=False)
            raise typer.Exit(EXIT_BAD_INPUT) from None
        except Exception as e:  # a bug in normswap or in the model: say so in one line
            if debug:
                traceback.print_exc()
            return _internal(e)

    return wrapper  # type: ignore[return-value]


def _internal(e: BaseException) -> Any:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    if isinstance(e, RuntimeError) and "can't allocate memory" in first:  # torch's allocator, not a bug
        err_console.print(Text.assemble(("error: ", "bold red"), f"out of memory ({first[:120]}); pass a smaller --input-shape or batch"),
                          highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    err_console.print(
        Text.assemble(
            ("error: ", "bold red"),
            f"unexpected {type(e).__name__}: {first} (rerun with --debug for the traceback, and please report it)",
        ),
        highlight=False,
    )
    raise typer.Exit(EXIT_INTERNAL) from None


# ---- torchrun ---------------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) set WORLD_SIZE / RANK for every process it starts."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0 under torch.distributed (the process that writes files and prints), else True."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def torchrun_aware(*writes: str) -> Callable[[F], F]:
    """Under ``torchrun --nproc_per_node N normswap ...``: join the process group (NCCL when the
    command's ``--device`` is a GPU, each rank on ``cuda:LOCAL_RANK``; gloo on the CPU) so calibration
    sums are all-reduced and recovery runs as DDP, and let only
    rank 0 print and write: on the other ranks the keyword arguments named in ``writes`` (output
    paths) are set to None and stdout is silenced. Every rank runs the same computation; all ranks
    meet at a barrier before the group is torn down. Without torchrun this changes nothing."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            if not launched_by_torchrun():
                return fn(*a, **kw)
            import torch.distributed as dist

            owned = not dist.is_initialized()
            if owned:
                from normswap import validate
                from normswap.devices import backend_for, resolve_device

                validate.runtime_options(**{k: kw.get(k) for k in ("device", "amp") if k in kw}, amp_needs_steps=False)
                device = resolve_device(kw.get("device", "cpu"))  # cuda → cuda:LOCAL_RANK
                if device.type == "cuda":
                    import torch

                    torch.cuda.set_device(device)
                # env:// from torchrun's MASTER_ADDR/PORT (or its --rdzv-endpoint), RANK, WORLD_SIZE
                dist.init_process_group(backend_for(device))
            rank = dist.get_rank()
            quiet = console.quiet
            if rank != 0:
                kw.update({k: None for k in writes})
                console.quiet = True
            try:
                try:
                    result = fn(*a, **kw)
                except typer.Exit:  # e.g. parity failed: a verdict, every rank still meets below
                    dist.barrier()
                    raise
                dist.barrier()  # rank 0 may still be exporting / writing
                return result
            finally:
                console.quiet = quiet
                if owned:
                    dist.destroy_process_group()

        return wrapper  # type: ignore[return-value]

    return deco


def print_json(obj: Any) -> None:
    import json

    if not is_main_process():
        return

    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
