"""What every pass returns, and the module surgery the passes share."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .capture import Capture

__all__ = ["SiteAction", "PassResult", "set_module", "unique_target", "assemble", "paused_gc"]


@dataclass
class SiteAction:
    """What a pass did at one norm site (or why it did nothing)."""

    site: str
    type: str
    action: str
    target: str | None = None
    reason: str | None = None
    exact: bool | None = None  # whether the site's eval function is unchanged
    notes: list[str] = field(default_factory=list)

    @property
    def rewritten(self) -> bool:
        return self.action not in ("refuse", "kept")

    def to_dict(self) -> dict[str, Any]:
        d = {"site": self.site, "type": self.type, "action": self.action, "target": self.target,
             "reason": self.reason, "exact": self.exact}
        if self.notes:
            d["notes"] = list(self.notes)
        return d


@dataclass
class PassResult:
    """A rewritten model plus what the pass did at every site.

    ``graphs`` maps each traced part's qualified name (``""`` = whole model) to its rewritten
    GraphModule; ``node_maps`` maps, per part, rewritten node names to the original node whose
    value they must equal (``None`` = no counterpart) — parity uses it to name the first node
    where a rewrite diverges.
    """

    model: nn.Module
    pass_name: str
    actions: list[SiteAction] = field(default_factory=list)
    graphs: dict[str, fx.GraphModule] = field(default_factory=dict)
    node_maps: dict[str, dict[str, str | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name, "sites": [a.to_dict() for a in self.actions]}


def set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``target`` under ``root`` (replacing what is there)."""
    parent_name, _, name = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, name, module)


def unique_target(root: nn.Module, base: str) -> str:
    """``base`` or ``base_1``, ``base_2``… — the first path not already taken under ``root``."""
    names = {n for n, _ in root.named_modules()} | {n for n, _ in root.named_parameters()} | {
        n for n, _ in root.named_buffers()
    }
    cand, i = base, 0
    while cand in names:
        i += 1
        cand = f"{base}_{i}"
    return cand


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (then back as it was). A pass creates
    thousands of fx nodes, modules and dicts and frees none until it ends, so each collection the
    allocations trigger only scans live objects. Measured (interleaved, median of 24): efficientnet_b0
    −3%, resnet50 −5%, mobilenet_v2 +3% (the deferred collection at the end costs about what it saves);
    small, but the fold's ratio to fx's fuse sits at 1.0."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def assemble(cap: Capture) -> nn.Module:
    """The rewritten model: the whole GraphModule, or the root with each traced part substituted.

    A substituted part keeps the plain attributes of the module it replaces (e.g. ``out_channels``)
    so a parent whose untraceable code reads them still works.
    """
    for part in cap.parts:
        gm = part.graph
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    if cap.whole:
        return cap.parts[0].graph
    for part in sorted(cap.parts, key=lambda p: p.qualname.count("."), reverse=True):
        old = cap.root.get_submodule(part.qualname)
        for k, v in vars(old).items():
            if not k.startswith("_") and k != "training" and not hasattr(part.graph, k):
                setattr(part.graph, k, v)
        set_module(cap.root, part.qualname, part.graph)
    return cap.root
