"""One run on many processes (DDP through ``torchrun`` or SLURM's ``srun``): who this process is, the process group,
the shard of every batch this rank computes, and the collectives that make N ranks compute what one process does.

- Who: ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (torchrun) or ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID`` (srun,
  which also gets ``MASTER_ADDR``/``MASTER_PORT`` from the job's first node and id). Without them: one process, no
  process group, everything below a no-op.
- Shards: every global batch (``batch_size`` rows) is split into contiguous, nearly equal shards, one per rank, in rank
  order; rank ``k`` computes rows ``start:stop`` (:class:`BatchShard`, published by the loader for each batch).
- Gradients: rank ``k`` weights its gradient by its share ``w_k = rows_k / rows`` and the ranks sum them
  (:func:`reduce_gradients`): for a loss that is a mean over the batch this is exactly the one-process gradient,
  whatever the shard sizes. The differentiable collectives (:func:`gather_batch`, :func:`sum_with_gradient`) scale
  their backward by ``1 / w_k`` so that statistics of the global batch (CORAL's covariances, GroupDRO's risks,
  BatchNorm's moments) get the one-process gradient too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from dmg.engine.ranks import Ranks, first_host, ranks_from_environment  # noqa: F401 - part of this module's API
from dmg.errors import BadValue, UserError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gloo", "nccl")


def device_for(name: str, ranks: Ranks) -> str:
    """The device a rank computes on: ``auto`` and ``cuda`` put rank ``k`` of a node on ``cuda:<local rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{ranks.local_rank}" if name == "cuda" and ranks.distributed else name


def backend_for(name: str, device: torch.device) -> str:
    """``auto``: NCCL between GPUs, gloo between CPUs; NCCL without a GPU is an error."""
    if name not in BACKENDS:
        raise BadValue("distributed.backend", f"one of {', '.join(BACKENDS)}", name)
    if name == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if name == "nccl" and device.type != "cuda":
        raise UserError(
            f"distributed.backend=nccl needs CUDA GPUs, but this run computes on {device.type}: "
            "use distributed.backend=gloo or auto"
        )
    return name


_ranks = Ranks()  # this process's ranks while a process group is up


def current() -> Ranks:
    """The ranks of the running job (one process outside :class:`ProcessGroup`)."""
    return _ranks


class ProcessGroup:
    """The job's process group, set up on entry and torn down on exit (a context manager); nothing for one process.

    ``timeout_s``: a rank waiting longer than this for the others (a peer died, or hangs) raises instead of hanging.
    """

    def __init__(self, ranks: Ranks, backend: str, device: torch.device, timeout_s: float):
        self.ranks, self.backend, self.device, self.timeout_s = ranks, backend, device, timeout_s

    def __enter__(self) -> Ranks:
        global _ranks
        if self.ranks.distributed:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group(
                self.backend,
                init_method="env://",
                rank=self.ranks.rank,
                world_size=self.ranks.world_size,
                timeout=timedelta(seconds=self.timeout_s),
            )
            _ranks = self.ranks
        return self.ranks

    def __exit__(self, kind, error, trace) -> None:
        global _ranks
        if not dist.is_initialized():
            return
        try:
            if kind is None:
                dist.barrier()  # rank 0 may still be writing; leave together
        finally:
            dist.destroy_process_group()
            _ranks = Ranks()


# ---- what every rank must agree on ----------------------------------------------------------------------------------


def broadcast(value):
    """Rank 0's ``value`` (any picklable object; tensors on the CPU) on every rank."""
    if not _ranks.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_writer(function, shared: tuple[type[Exception], ...] = (UserError,)):
    """``function()`` run on rank 0 alone; its ``shared`` exceptions (a :class:`UserError`) are raised on every rank,
    so that no rank waits for a rank 0 that has given up. Returns the result on rank 0, None elsewhere."""
    if not _ranks.distributed:
        return function()
    result, problem = None, None
    if _ranks.is_writer:
        try:
            result = function()
        except shared as error:
            problem = error
    problem = broadcast(problem)
    if problem is not None:
        raise problem
    return result


def differing_keys(flat: dict[str, str]) -> list[str]:
    """The keys of ``flat`` (a flattened, resolved config) whose values differ between the ranks; [] for one."""
    if not _ranks.distributed:
        return []
    everyone: list = [None] * _ranks.world_size
    dist.all_gather_object(everyone, flat)
    keys = set().union(*everyone)
    return sorted(key for key in keys if len({str(config.get(key)) for config in everyone}) > 1)


def to_cpu(tree):
    """A nested state (dicts, lists, tensors) with every tensor on the CPU: what :func:`broadcast` sends."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {key: to_cpu(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(to_cpu(value) for value in tree)
    return tree


class RankZeroCheckpoints:
    """The run's checkpoints as every rank sees them: rank 0 reads and writes the files (``files``, a
    :class:`~dmg.engine.checkpoints.Checkpointer`); the other ranks (``files`` None) load what rank 0 restored, sent
    to them (their disks may not hold the files), and write nothing. One process: the files, unchanged."""

    def __init__(self, files):
        self.files = files

    def restore(self, method: nn.Module, averaging=None) -> list[dict]:
        """Rank 0's restored state (or its fresh one) on every rank; returns the metrics history so far."""
        history = self.files.restore(method, averaging) if self.files else []
        if not _ranks.distributed:
            return history
        state = (history, method.state_dict(), method.training_state(), averaging.state_dict() if averaging else {})
        history, weights, training, averaged = broadcast(to_cpu(state) if _ranks.is_writer else None)
        if not _ranks.is_writer:
            method.load_state_dict(weights)
            method.load_training_state(training)
            if averaging is not None:
                averaging.load_state_dict(averaged)
        return history

    def save(self, *args, **kwargs) -> None:
        if self.files:
            self.files.save(*args, **kwargs)

    def save_best(self, *args, **kwargs) -> None:
        if self.files:
            self.files.save_best(*args, **kwargs)

    def remove(self) -> None:
        if self.files:
            self.files.remove()


# ---- shards of a batch ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchShard:
    """The rows of a global batch that this rank computes: ``sizes[r]`` rows for rank ``r``, in rank order."""

    sizes: tuple[int, ...]
    rank: int = 0

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def weight(self) -> float:
        """This rank's share of the batch: the weight of its gradient and loss terms."""
        return self.sizes[self.rank] / max(self.total, 1)


def shard_of(rows: int, ranks: Ranks | None = None) -> BatchShard:
    """A batch of ``rows`` split into contiguous, nearly equal shards (the first ``rows % world`` get one more)."""
    ranks = ranks or _ranks
    base, extra = divmod(rows, ranks.world_size)
    return BatchShard(tuple(base + (r < extra) for r in range(ranks.world_size)), ranks.rank)


_shard: BatchShard | None = None  # the shard of the batch being computed (set by the loader)


def set_batch_shard(shard: BatchShard) -> None:
    global _shard
    _shard = shard


def batch_shard(rows: int) -> BatchShard:
    """The shard of the batch being computed, whose local part has ``rows`` rows (the whole batch in one process)."""
    if not _ranks.distributed or _shard is None:
        return BatchShard((rows,))
    return _shard


def rand_rows_like(local: torch.Tensor) -> torch.Tensor:
    """``torch.rand_like(local)`` for this rank's rows of the global batch: every rank draws the whole batch's
    numbers from the same generator state and keeps its own rows, so per-sample draws equal one process's."""
    shard = batch_shard(len(local))
    if not _ranks.distributed:
        return torch.rand_like(local)
    drawn = torch.rand((shard.total, *local.shape[1:]), dtype=local.dtype, device=local.device)
    return drawn[shard.start : shard.stop]


# ---- collectives with gradients -------------------------------------------------------------------------------


class _SumAcrossRanks(torch.autograd.Function):
    """Sum over ranks; backward: the share-weighted sum of the ranks' gradients, divided by this rank's share."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        total = gradient * ctx.weight
        dist.all_reduce(total)
        return total / ctx.weight, None


class _GatherRows(torch.autograd.Function):
    """The ranks' rows concatenated in rank order; backward: this rank's rows of the share-weighted gradient sum."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank, ctx.weight = sizes, rank, sizes[rank] / sum(sizes)
        padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
        padded[: len(tensor)] = tensor
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        total = gradient * ctx.weight
        dist.all_reduce(total)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]] / ctx.weight, None, None


def gather_batch(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The global batch of each per-sample tensor (rows in one-process order), gradients flowing back to this rank's
    rows; the tensors themselves in one process. For losses built from statistics of the whole batch."""
    if not _ranks.distributed:
        return tensors
    shard = batch_shard(len(tensors[0]))
    gathered = []
    for tensor in tensors:
        if tensor.requires_grad:
            gathered.append(_GatherRows.apply(tensor, shard.sizes, shard.rank))
        else:
            with torch.no_grad():
                gathered.append(_GatherRows.apply(tensor, shard.sizes, shard.rank))
    return tuple(gathered)


def sum_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks, differentiable (statistics of the global batch)."""
    if not _ranks.distributed:
        return tensor
    return _SumAcrossRanks.apply(tensor, batch_shard(0).weight)


@torch.no_grad()
def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over ranks (a copy), e.g. evaluation counts; ``tensor`` itself in one process."""
    if not _ranks.distributed:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total)
    return total


@torch.no_grad()
def min_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The minimum of ``tensor`` over ranks (a copy); ``tensor`` itself in one process."""
    if not _ranks.distributed:
        return tensor
    least = tensor.clone()
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return least


def dealt(items: list) -> list:
    """This rank's items when whole items are dealt to the ranks in turn (evaluation batches); all in one process."""
    return items[_ranks.rank :: _ranks.world_size]


@torch.no_grad()
def reduce_gradients(parameters) -> None:
    """Replace each parameter's gradient by the share-weighted sum over ranks (the one-process gradient); a parameter
    without a gradient on every rank keeps none (an optimiser skips it, as in one process). One collective."""
    if not _ranks.distributed:
        return
    parameters = list(parameters)
    weight = batch_shard(0).weight
    grads = [p.grad for p in parameters]
    present = torch.tensor([g is not None for g in grads], dtype=torch.float32, device=parameters[0].device)
    flat = torch.cat(
        [(g * weight if g is not None else torch.zeros_like(p)).reshape(-1).float() for p, g in zip(parameters, grads)]
        + [present]
    )
    dist.all_reduce(flat)
    anywhere = flat[-len(parameters) :].tolist()
    for parameter, values, used in zip(
        parameters, flat[: -len(parameters)].split([p.numel() for p in parameters]), anywhere
    ):
        parameter.grad = values.view_as(parameter).to(parameter.dtype) if used else None


# ---- batch normalisation over the global batch --------------------------------------------------------------------


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch (SyncBatchNorm, on any backend and device,
    with the share-weighted gradient of :func:`sum_with_gradient`); plain BatchNorm in one process and in eval mode.

    Same parameters, buffers and state_dict keys as the BatchNorm it replaces (:func:`convert_batch_norm`).
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {input.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _ranks.distributed):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *(1,) * (x.dim() - 2))
        values = x.float()
        rows = values.new_full((1,), values.numel() // max(x.shape[1], 1))  # samples x positions, per channel
        sums = sum_with_gradient(torch.cat([values.sum(dims), rows]))
        mean, count = sums[:-1] / sums[-1], sums[-1].detach()
        centred = values - mean.view(shape)
        variance = sum_with_gradient(centred.pow(2).sum(dims)) / count
        self._update_running_stats(mean.detach(), variance.detach(), count)
        out = centred * torch.rsqrt(variance + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor, count: torch.Tensor) -> None:
        if not self.track_running_stats:
            return
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        unbiased = variance * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_batch_norm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer turned into a :class:`GlobalBatchNorm` in place: the same objects keep
    their parameters (which the optimisers already hold), buffers and hooks; only their ``forward`` changes."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.__class__ = GlobalBatchNorm
    return module
