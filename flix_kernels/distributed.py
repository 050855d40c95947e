"""FLix layers under PyTorch's own tensor parallelism (``torch.distributed.tensor.parallel``).

DDP and FSDP2 need nothing from here: a model with FLix layers is wrapped as any other (only
lora_A / lora_B require grad, so only they are reduced), each rank routes its own batch with
its own :class:`~flix_kernels.Routing`, and :func:`~flix_kernels.save_adapters` /
:func:`~flix_kernels.load_adapters` understand sharded (DTensor) parameters.

Tensor parallelism: :class:`ColwiseFLix` and :class:`RowwiseFLix` are ``ParallelStyle`` s for
``parallelize_module``, the FLix counterparts of ``ColwiseParallel`` / ``RowwiseParallel``
(which accept only ``nn.Linear``). Every rank of the TP group routes the same batch, so the
routing (host-side, built per rank) is identical across the group; this is checked once per
routing (a tiny all-gather), and a mismatch raises on every rank. With ``R`` the per-token
low-rank width (the routed slots' total rank; see ``torch_backend.delta``):

* **column-parallel** (W, bias and lora_B sharded on the output dim, lora_A replicated): x is
  replicated; each rank computes ``h = s x A_S^T`` (identical everywhere) and its output
  columns ``x W_r^T + b_r + h B_{S,r}^T``. Backward: the base's own all-reduce of dx (T x in),
  plus an all-reduce of the partial ``dh = dy_r B_{S,r}`` (T x R) so that dA and the low-rank
  part of dx are those of the whole layer.
* **row-parallel** (W and lora_A sharded on the input dim, lora_B and bias replicated): x
  arrives sharded on its last dim; each rank computes its partial ``h_r = s x_r A_{S,r}^T``,
  h is all-reduced (T x R) before the expand, and the base's partial output is all-reduced
  (T x out, the layer's own collective) before the bias and update are added. Backward needs
  no collective: dy and h are replicated.

The added traffic per layer and step is ``T * R`` elements against the base's ``T * in`` or
``T * out``: R is the active rank (tens) against hidden sizes in the thousands.

The low-rank part runs on backend "torch" (two GEMMs or batched GEMMs, the fastest backend for
prefill and decode on the GPUs measured), with its strategy chosen to keep h small.
Column-parallel layers refuse dropout: every rank would need the same mask of the replicated
x, which needs an RNG synchronised across the TP group.
"""

from __future__ import annotations

import zlib
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .backends import torch_backend
from .nn import FLixLinear
from .ops import _validate
from .routing import Routing

__all__ = ["ColwiseFLix", "RowwiseFLix"]

try:  # DTensor / tensor parallelism; absent from builds without torch.distributed
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ParallelStyle
except ImportError:  # pragma: no cover - depends on the torch build
    DTensor = None
    ParallelStyle = object


class _AllReduceForward(torch.autograd.Function):
    """Sum over the group in forward; identity in backward (the gradient is already replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceBackward(torch.autograd.Function):
    """Identity in forward; sum of the partial gradients over the group in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _fingerprint(routing: Routing) -> torch.Tensor:
    parts = [routing.feature_ids.to(torch.int64).contiguous().cpu().numpy().tobytes()]
    if routing.cu_seqlens is not None:
        parts.append(routing.cu_seqlens.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return torch.tensor([routing.num_examples, zlib.crc32(b"|".join(parts))], dtype=torch.int64)


def _check_same_routing(routing: Routing, group, device: torch.device) -> None:
    """Every rank of a TP group must route the same batch: compared once per routing and group
    (one tiny all-gather; later layers hit the routing's cache). All ranks raise together."""

    def check():
        mine = _fingerprint(routing).to(device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        if not all(torch.equal(e, every[0]) for e in every):
            ranks = [i for i, e in enumerate(every) if not torch.equal(e, every[0])]
            raise ValueError(f"the ranks of a tensor-parallel group were given different routings (group ranks "
                             f"{ranks} differ from rank 0's): every TP rank must route the same batch, with the same "
                             "feature ids, cu_seqlens and feature-dropout draws")
        return True

    routing.cached(("tp_same_routing", id(group)), check)


def _set_param(module: nn.Module, name: str, value: torch.Tensor, requires_grad: bool) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=requires_grad))


class _FLixParallel(ParallelStyle):
    kind = ""

    def __init__(self, *, use_local_output: bool = True):
        super().__init__()
        self.use_local_output = use_local_output

    def _placements(self, module: FLixLinear) -> list:
        """``(owner module, parameter name, placement)`` of every parameter to distribute."""
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        name = type(self).__name__
        if not isinstance(module, FLixLinear):
            raise TypeError(f"{name} applies to FLixLinear layers, got {type(module).__name__}; use torch's "
                            "ColwiseParallel / RowwiseParallel for plain nn.Linear")
        if type(module.base_layer) is not nn.Linear:
            raise TypeError(f"{name} needs an nn.Linear base layer, got {type(module.base_layer).__name__}")
        if device_mesh.ndim != 1:
            raise ValueError(f"{name} needs a 1-D (tensor-parallel) device mesh, got {device_mesh.ndim}-D; pass "
                             "mesh['tp'] of a 2-D mesh")
        if module.merged is not None:
            raise RuntimeError(f"{name}: the layer has a merged feature set; unmerge before parallelising")
        if getattr(module, "_parallel", None) is not None:
            raise RuntimeError(f"{name}: the layer is already tensor-parallel")
        if self.kind == "colwise" and module.dropout > 0:
            raise ValueError(f"{name}: dropout={module.dropout} on a column-parallel FLix layer would need the same "
                             "dropout mask on every rank (an RNG synchronised across the TP group, not provided); "
                             "set the layer's dropout to 0")
        tp = device_mesh.size()
        dims = {"colwise": ("out_features", module.out_features), "rowwise": ("in_features", module.in_features)}
        what, size = dims[self.kind]
        if size % tp:
            raise ValueError(f"{name}: {what}={size} is not divisible by the tensor-parallel size {tp}")
        for owner, pname, place in self._placements(module):
            p = getattr(owner, pname)
            if p is None:
                continue
            # src_data_rank=None: every rank holds the same full tensor (same init or checkpoint),
            # so each takes its own shard without a scatter.
            dt = distribute_tensor(p.detach(), device_mesh, [place], src_data_rank=None)
            _set_param(owner, pname, dt, p.requires_grad)
        module._parallel = self
        module._tp_group = device_mesh.get_group()
        return module

    def forward(self, module: FLixLinear, x: torch.Tensor, routing: Optional[Routing]) -> torch.Tensor:
        raise NotImplementedError


class ColwiseFLix(_FLixParallel):
    """Column-parallel FLix layer: input replicated, output sharded on its last dim (a local
    tensor, or a ``Shard(-1)`` DTensor with ``use_local_output=False``). Feeds a
    :class:`RowwiseFLix` layer (or torch's ``RowwiseParallel``) as in a Megatron MLP."""

    kind = "colwise"

    def _placements(self, module):
        base = module.base_layer
        return [(base, "weight", Shard(0)), (base, "bias", Shard(0)), (module, "lora_A", Replicate()),
                (module, "lora_B", Shard(0))]

    def forward(self, module, x, routing):
        if module.training and module.dropout > 0:
            raise ValueError(f"dropout={module.dropout} on a column-parallel FLix layer is not supported (the "
                             "replicated input would need the same mask on every rank); set the layer's dropout to 0")
        group = module._tp_group
        _check_same_routing(routing, group, module.lora_A.device)
        if DTensor is not None and isinstance(x, DTensor):
            x = x.full_tensor() if any(not p.is_replicate() for p in x.placements) else x.to_local()
        w, b = _local(module.base_layer.weight), _local(module.base_layer.bias)
        A, B = _local(module.lora_A), _local(module.lora_B)
        _validate(x, A, B, routing, module.scaling, 0.0, w, b, with_base=True)
        # dx of the base is partial per rank: summed by the layer's own all-reduce.
        y = F.linear(_AllReduceBackward.apply(x, group), w, b)
        # h is identical on every rank; its gradient dy_r B_r is partial: summed before dA and dx.
        d = torch_backend.delta(x, A, B, routing, module.scaling, 0.0, None,
                                h_hook=lambda h: _AllReduceBackward.apply(h, group))
        y = y + d.to(y.dtype)
        if not self.use_local_output:
            y = DTensor.from_local(y, module.base_layer.weight.device_mesh, [Shard(-1)], run_check=False)
        return y


class RowwiseFLix(_FLixParallel):
    """Row-parallel FLix layer: input sharded on its last dim (a local tensor, as a
    :class:`ColwiseFLix` layer outputs, or a ``Shard(-1)`` DTensor), output replicated."""

    kind = "rowwise"

    def _placements(self, module):
        base = module.base_layer
        return [(base, "weight", Shard(1)), (base, "bias", Replicate()), (module, "lora_A", Shard(1)),
                (module, "lora_B", Replicate())]

    def forward(self, module, x, routing):
        group = module._tp_group
        _check_same_routing(routing, group, module.lora_A.device)
        if DTensor is not None and isinstance(x, DTensor):
            pl = x.placements
            if len(pl) != 1 or not pl[0].is_shard() or pl[0].dim not in (-1, x.dim() - 1):
                raise ValueError(f"RowwiseFLix expects its input sharded on the last dim, got {x.placements}")
            x = x.to_local()
        w, b = _local(module.base_layer.weight), _local(module.base_layer.bias)
        A, B = _local(module.lora_A), _local(module.lora_B)
        _validate(x, A, B, routing, module.scaling, 0.0, w, None, with_base=True)
        y = _AllReduceForward.apply(F.linear(x, w), group)  # the layer's own collective
        p = module.dropout if module.training else 0.0
        d = torch_backend.delta(x, A, B, routing, module.scaling, p, None,
                                h_hook=lambda h: _AllReduceForward.apply(h, group))
        y = y + d.to(y.dtype)
        if b is not None:
            y = y + b
        if not self.use_local_output:
            y = DTensor.from_local(y, module.base_layer.weight.device_mesh, [Replicate()], run_check=False)
        return y
