"""Which activation-checkpoint region is running, so a recomputed forward can replay the
routing of its original forward.

``torch.utils.checkpoint`` recomputes a region's forward during backward. FLix layers read
the model's routing from module state, which may have been cleared (the backward ran after a
``use_routing`` block) or replaced (another micro-batch was routed) since the original
forward. So each FLix layer stores the routing it used on the checkpoint region object
itself (one per checkpoint call: the non-reentrant ``_CheckpointFrame``, or the reentrant
``CheckpointFunction`` ctx) and reads it back when that region is recomputed. The region
lives exactly as long as its saved activations, so nothing leaks.

These are torch internals; every lookup is defensive and returns None when the structure is
not recognised (the layer then falls back to its most recent grad-enabled routing). The
test suite pins the behaviour for both checkpoint modes.
"""

from __future__ import annotations

import sys
import weakref

import torch

try:  # torch >= 2.1
    from torch.utils.checkpoint import CheckpointFunction, _CheckpointFrame
except ImportError:  # pragma: no cover
    CheckpointFunction = _CheckpointFrame = None

_REENTRANT_CODES = (
    {CheckpointFunction.forward.__code__, CheckpointFunction.backward.__code__} if CheckpointFunction else set()
)
_ATTR = "_flix_routings"


def _frame_in_closure(fn, depth: int = 0):
    """The _CheckpointFrame that a checkpoint saved-tensor hook closes over (maybe via a weakref)."""
    if fn is None or depth > 3:
        return None
    fn = getattr(fn, "__wrapped__", fn)
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            v = cell.cell_contents
        except ValueError:
            continue
        if isinstance(v, weakref.ReferenceType):
            v = v()
        if _CheckpointFrame is not None and isinstance(v, _CheckpointFrame):
            return v
        if callable(v) and not isinstance(v, type):
            found = _frame_in_closure(v, depth + 1)
            if found is not None:
                return found
    return None


def current_region(scan_stack: bool):
    """The checkpoint region whose forward or recomputation is running, else None.

    Non-reentrant checkpoint is recognised from the saved-tensor hooks it installs (cheap);
    reentrant checkpoint only by walking the Python stack, done when ``scan_stack``.
    """
    try:
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    except Exception:  # pragma: no cover - API moved
        hooks = None
    if hooks:
        frame = _frame_in_closure(hooks[0])
        if frame is not None:
            return frame
    if scan_stack and _REENTRANT_CODES:
        f = sys._getframe(1)
        while f is not None:
            if f.f_code in _REENTRANT_CODES:
                return f.f_locals.get("ctx")
            f = f.f_back
    return None


def remember(region, layer, routing) -> None:
    """Store ``routing`` for ``layer`` on the checkpoint region."""
    try:
        table = getattr(region, _ATTR, None)
        if table is None:
            table = {}
            setattr(region, _ATTR, table)
        table[id(layer)] = routing
    except (AttributeError, TypeError):  # pragma: no cover - region does not take attributes
        pass


def recall(region, layer):
    """The routing ``layer`` used in the original forward of ``region``, or None."""
    table = getattr(region, _ATTR, None)
    return None if table is None else table.get(id(layer))


def in_backward() -> bool:
    """True while autograd's engine runs (a checkpointed forward being recomputed)."""
    graph_task = getattr(torch._C, "_current_graph_task_id", None)
    return graph_task is not None and graph_task() != -1
