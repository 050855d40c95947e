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
Tensor-parallel layers refuse dropout in training: the masks of a replicated x would have to
agree across ranks, those of a sharded x must differ, and neither is provided.
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
    DTensor = Replicate = Shard = distribute_tensor = None
    ParallelStyle = object


class _AllReduceForward(torch.autograd.Function):
    """Sum over the group in forward, in place (its inputs here are fresh GEMM outputs that no
    backward needs); identity in backward (the gradient is already replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.mark_dirty(x)
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
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def _local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return t.to_local() if is_dtensor(t) else t


def _fingerprint(routing: Routing, token_shape) -> torch.Tensor:
    parts = [routing.feature_ids.to(torch.int64).contiguous().cpu().numpy().tobytes(), repr(tuple(token_shape)).encode()]
    if routing.cu_seqlens is not None:
        parts.append(routing.cu_seqlens.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return torch.tensor([routing.num_examples, zlib.crc32(b"|".join(parts))], dtype=torch.int64)


def _check_same_routing(routing: Routing, token_shape, group, device: torch.device) -> None:
    """Every rank of a TP group must route the same batch (and token shape): compared once per
    routing, shape and group (one tiny all-gather; later layers hit the routing's cache). All
    ranks raise together. Ranks must therefore build their routings alike (one per batch)."""

    def check():
        mine = _fingerprint(routing, token_shape).to(device)
        every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        every = torch.stack(every).cpu()  # one host copy
        ranks = [i for i in range(len(every)) if not torch.equal(every[i], every[0])]
        if ranks:
            raise ValueError(f"the ranks of a tensor-parallel group were given different routings or input shapes "
                             f"(group ranks {ranks} differ from rank 0's): every TP rank must route the same batch, "
                             "with the same feature ids, cu_seqlens, feature-dropout draws and token shape")
        return True

    routing.cached(("tp_same_routing", id(group), tuple(token_shape)), check)


class _FLixParallel(ParallelStyle):
    """Shared by the two styles: checks, parameter distribution, and the per-call prelude."""

    sharded_dim = ""  # "out_features" (column) or "in_features" (row)

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
        if module._parallel is not None:
            raise RuntimeError(f"{name}: the layer is already tensor-parallel")
        size = getattr(module, self.sharded_dim)
        if size % device_mesh.size():
            raise ValueError(f"{name}: {self.sharded_dim}={size} is not divisible by the tensor-parallel size "
                             f"{device_mesh.size()}")
        # torch's styles scatter from src_data_rank (parallelize_module's argument, default 0), so
        # ranks need not hold the same initial tensors; None: every rank keeps its own shard.
        src = getattr(self, "src_data_rank", 0)
        for owner, pname, place in self._placements(module):
            p = getattr(owner, pname)
            if p is not None:
                dt = distribute_tensor(p.detach(), device_mesh, [place], src_data_rank=src)
                setattr(owner, pname, nn.Parameter(dt, requires_grad=p.requires_grad))
        module._parallel, module._tp_mesh = self, device_mesh
        return module

    def forward(self, module: FLixLinear, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        if module.training and module.dropout > 0:
            # Masks of a replicated x would have to agree across ranks, and those of the shards of
            # a sharded x must not (identically seeded ranks would draw the same pattern).
            raise ValueError(f"dropout={module.dropout} is not supported on tensor-parallel FLix layers (it needs an "
                             "RNG coordinated across the TP group); set the layer's dropout to 0 for training")
        x = self._input(x)
        group = self._group(module)
        _check_same_routing(routing, x.shape[:-1], group, module.lora_A.device)
        w, b = _local(module.base_layer.weight), _local(module.base_layer.bias)
        A, B = _local(module.lora_A), _local(module.lora_B)
        y = self._compute(module, x, w, b, A, B, routing, group)
        if not self.use_local_output:
            y = DTensor.from_local(y, module._tp_mesh, [self.output_placement], run_check=False)
        return y

    @staticmethod
    def _group(module):
        return module._tp_mesh.get_group()


class ColwiseFLix(_FLixParallel):
    """Column-parallel FLix layer: input replicated, output sharded on its last dim (a local
    tensor, or a ``Shard(-1)`` DTensor with ``use_local_output=False``). Feeds a
    :class:`RowwiseFLix` layer (or torch's ``RowwiseParallel``) as in a Megatron MLP."""

    sharded_dim = "out_features"
    output_placement = Shard(-1) if DTensor is not None else None

    def _placements(self, module):
        base = module.base_layer
        return [(base, "weight", Shard(0)), (base, "bias", Shard(0)), (module, "lora_A", Replicate()),
                (module, "lora_B", Shard(0))]

    @staticmethod
    def _input(x):
        if is_dtensor(x):
            return x.full_tensor() if any(not p.is_replicate() for p in x.placements) else x.to_local()
        return x

    def _compute(self, module, x, w, b, A, B, routing, group):
        _validate(x, A, B, routing, module.scaling, 0.0, w, b, with_base=True)
        # dx of the base is partial per rank: summed by the layer's own all-reduce.
        y = F.linear(_AllReduceBackward.apply(x, group), w, b)
        # h is identical on every rank; its gradient dy_r B_r is partial: summed before dA and dx.
        d = torch_backend.delta(x, A, B, routing, module.scaling, 0.0, None,
                                h_hook=lambda h: _AllReduceBackward.apply(h, group))
        return y + d.to(y.dtype)


class RowwiseFLix(_FLixParallel):
    """Row-parallel FLix layer: input sharded on its last dim (a local tensor, as a
    :class:`ColwiseFLix` layer outputs, or a ``Shard(-1)`` DTensor), output replicated."""

    sharded_dim = "in_features"
    output_placement = Replicate() if DTensor is not None else None

    def _placements(self, module):
        base = module.base_layer
        return [(base, "weight", Shard(1)), (base, "bias", Replicate()), (module, "lora_A", Shard(1)),
                (module, "lora_B", Replicate())]

    @staticmethod
    def _input(x):
        if is_dtensor(x):
            pl = x.placements
            if len(pl) != 1 or not pl[0].is_shard() or pl[0].dim not in (-1, x.dim() - 1):
                raise ValueError(f"RowwiseFLix expects its input sharded on the last dim, got {x.placements}")
            return x.to_local()
        return x

    def _compute(self, module, x, w, b, A, B, routing, group):
        _validate(x, A, B, routing, module.scaling, 0.0, w, b, with_base=True)
        y = _AllReduceForward.apply(F.linear(x, w), group)  # the layer's own collective
        d = torch_backend.delta(x, A, B, routing, module.scaling, 0.0, None,
                                h_hook=lambda h: _AllReduceForward.apply(h, group))
        y = y + d.to(y.dtype)
        return y if b is None else y + b.to(y.dtype)
