"""The routing of a call: what ``use_routing``, ``accept_feature_ids`` and ``generate`` set for
the forward (or the block) that one thread or asyncio task is running.

A server calling one model from a thread pool, or from several asyncio tasks, runs forwards
with different features at the same time, so a per-call routing must not be stored on the
layers (every thread would read the last one written). It lives in a context variable (one
value per thread and per asyncio task): a table ``id(layer) -> Routing``. A call pushes a frame
holding the table of every frame below it plus its own layers, and removes its own frame when
it ends; frames are removed by identity, not popped in order, because several hooks of one
module run their "after" halves in registration order, not in reverse. Layers read the
innermost frame's table, then fall back to :func:`flix_kernels.set_routing`'s model-wide
routing (kept on the layer: it is what autograd's worker threads and ``nn.DataParallel``'s
replicas see).

``torch.compile`` cannot trace a ``ContextVar``, so the innermost table is mirrored in a
``threading.local`` that compiled layers read. That is exact for a forward (it runs to its end
in one thread without yielding to another task); a ``use_routing`` block that spans ``await``s
in several asyncio tasks of one thread is exact only for eager (uncompiled) layers.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Callable, Iterable

from .routing import Routing

__all__ = ["push", "remove", "current", "traced", "install_hooks", "remove_hooks"]


class Frame:
    """One call's routing: ``owner`` is the object that pushed it (to remove it by), ``table``
    every routed layer's routing, this call's and the enclosing calls'."""

    __slots__ = ("owner", "table")

    def __init__(self, owner: object, table: dict[int, Routing]):
        self.owner, self.table = owner, table


_FRAMES: contextvars.ContextVar[tuple[Frame, ...]] = contextvars.ContextVar("flix_kernels_call_routing", default=())
_MIRROR = threading.local()  # .table: the innermost frame's table of this thread, for compiled layers


def _set(frames: tuple[Frame, ...]) -> None:
    _FRAMES.set(frames)
    _MIRROR.table = frames[-1].table if frames else None


def push(owner: object, layers: Iterable, routing: Routing | None) -> Frame:
    """Route ``layers`` with ``routing`` (None: no routing) for this thread or task until
    :func:`remove`; the layers must have accepted it (``FLixLinear.prepare_routing``) already."""
    frames = _FRAMES.get()
    table = dict(frames[-1].table) if frames else {}
    table.update(dict.fromkeys(map(id, layers), routing))
    frame = Frame(owner, table)
    _set(frames + (frame,))
    return frame


def remove(frame: Frame | None = None, *, owner: object = None) -> None:
    """Remove ``frame``, or the innermost frame pushed by ``owner``, from this thread's or task's
    frames (nothing when there is none)."""
    frames = _FRAMES.get()
    for i in range(len(frames) - 1, -1, -1):
        if frames[i] is frame or (frame is None and frames[i].owner is owner):
            _set(frames[:i] + frames[i + 1:])
            return


def current(layer, default: Routing | None) -> Routing | None:
    """The routing of ``layer`` in this thread's or task's innermost call (None where a call
    routed it with None), else ``default`` (eager)."""
    frames = _FRAMES.get()
    return frames[-1].table.get(id(layer), default) if frames else default


def traced(layer, default: Routing | None) -> Routing | None:
    """:func:`current` as a compiled region reads it (the per-thread mirror)."""
    table = getattr(_MIRROR, "table", None)
    return default if table is None else table.get(id(layer), default)


# Hooks that route a module's forwards for the calls of a context (generate's), installed once
# per module and kept: adding and removing hooks per call would race with forwards running in
# other threads (torch iterates a module's hook dicts while it calls them).
_HOOKS_ATTR = "_flix_call_routing_hooks"
_HOOKS_LOCK = threading.Lock()


def install_hooks(module, pre: Callable, post: Callable) -> None:
    """Install the forward hooks ``pre`` (with kwargs) and ``post`` (always called) on ``module``
    once; a later call with the same module does nothing."""
    with _HOOKS_LOCK:
        if module.__dict__.get(_HOOKS_ATTR) is None:
            module.__dict__[_HOOKS_ATTR] = (module.register_forward_pre_hook(pre, with_kwargs=True),
                                            module.register_forward_hook(post, always_call=True))


def remove_hooks(model) -> None:
    """Remove the hooks :func:`install_hooks` put on ``model`` or its submodules."""
    with _HOOKS_LOCK:
        for m in model.modules():
            for handle in m.__dict__.pop(_HOOKS_ATTR, None) or ():
                handle.remove()
