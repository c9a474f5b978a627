"""Several processes under torchrun: process group, DDP / FSDP2 wrapping, cross-rank sums.

Everything a Trainer does differently on N processes goes through one `DistContext`; with
one process (strategy none) every method is a no-op and the single-process path is
untouched. The process group comes from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT): gloo on CPU, nccl on CUDA, with
`distributed.timeout_s` on every collective so a dead rank ends the job instead of hanging
it. Sharded (FSDP2) checkpoints live in `train/dcp.py`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from bitblend.config.schema import DistributedConfig, Recipe
from bitblend.errors import BitblendError

if TYPE_CHECKING:  # the step pulls in models and transformers; a launch needs neither
    from bitblend.train.step import StepLosses

_CTX: DistContext | None = None  # one process group per process, shared by cli and Trainer


def launched_world() -> int:
    """WORLD_SIZE as torchrun set it (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


def resolve_strategy(strategy: str, world: int) -> str:
    """`auto` -> none for one process, ddp for several; none with several is an error."""
    if strategy == "auto":
        return "none" if world == 1 else "ddp"
    if strategy == "none" and world > 1:
        raise BitblendError(
            f"distributed.strategy: none runs one process but torchrun started {world}; "
            "use auto, ddp or fsdp2"
        )
    return strategy


def check_recipe(recipe: Recipe, strategy: str, world: int = 1) -> None:
    """One-line refusals of what does not (yet) run under `strategy` (docs/distributed.md)."""
    if strategy == "none":
        return
    mix, prec = recipe.mixing, recipe.precision
    # Every rank takes an equal contiguous part of each global micro-batch.
    sizes: list[tuple[str, int | None]] = [("train.batch_size", recipe.train.batch_size)]
    if mix.batches == "homogeneous":
        sizes += [(f"tasks[{i}].batch_size", t.batch_size) for i, t in enumerate(recipe.tasks)]
    for name, size in sizes:
        if size is not None and size % world:
            raise BitblendError(
                f"{name}: {size} is not divisible by {world} ranks (it is the global batch; "
                f"each rank takes an equal part); use a multiple of {world}"
            )
    if mix.balancing in ("upgrad", "pcgrad"):
        raise BitblendError(
            f"mixing.balancing: {mix.balancing} aggregates per-task gradients before the "
            f"all-reduce, which {strategy} does not support; use uncertainty, famo or static, "
            "or run it in one process (distributed.strategy: none)"
        )
    if strategy != "fsdp2":
        return
    if prec.recipe in ("fp8", "fp8-emulated", "bf16-true", "16-mixed"):
        raise BitblendError(
            f"precision.recipe: {prec.recipe} is not supported under distributed.strategy "
            "fsdp2; use bf16-mixed or 32-true with fsdp2, or keep the recipe with ddp"
        )
    if prec.state_bits != 32:
        raise BitblendError(
            f"precision.state_bits: {prec.state_bits}-bit optimizer states are not supported "
            "under distributed.strategy fsdp2 (sharded DTensor parameters); use state_bits 32 "
            "with fsdp2, or keep the low-bit states with ddp"
        )
    if mix.grad_cosine_every:
        raise BitblendError(
            "mixing.grad_cosine_every: the gradient-conflict probe needs unsharded weights; "
            "set it to 0 under fsdp2 or use ddp"
        )


@dataclass
class DistContext:
    """This process's place in the job; strategy none = one process, every call a no-op."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    cfg: DistributedConfig = field(default_factory=DistributedConfig)
    owns_group: bool = False
    comm_device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes the run directory."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (ddp or fsdp2, any world size)."""
        return self.strategy != "none"

    @property
    def sharded(self) -> bool:
        """Parameters are sharded over the ranks (fsdp2): checkpoints go through DCP."""
        return self.strategy == "fsdp2"

    def describe(self) -> dict[str, Any]:
        """For summary.json."""
        return {"strategy": self.strategy, "world_size": self.world_size}

    # -- setup ---------------------------------------------------------------------------
    def device_for(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK on GPUs, the CPU otherwise."""
        if device.type == "cuda" and self.active:
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module, precision: Any) -> Any:
        """The module the training step calls: DDP around `model`, or `model` sharded in
        place by FSDP2 (fully_shard per transformer block, fp32-kept modules, root).
        Typed Any: DDP is no MultiTaskModel but forwards every call to one."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.local_rank] if self.comm_device.type == "cuda" else None
            # gradient_as_bucket_view: `.grad` tensors are views into DDP's flat all-reduce
            # buckets, so no second gradient-sized buffer exists and no copy runs into and
            # out of the buckets every step (87 MiB each way on MiniLM). A `.grad = None`
            # (zero_grad, the fp32-master path) is fine: the reducer re-attaches the view.
            return DistributedDataParallel(
                model,
                device_ids=ids,
                find_unused_parameters=self.cfg.find_unused_parameters,
                gradient_as_bucket_view=True,
            )
        if self.strategy == "fsdp2":
            shard_model(model, precision, self.comm_device.type, self.world_size)
        return model

    # -- collectives ---------------------------------------------------------------------
    def _sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.comm_device)
        dist.all_reduce(t)
        return [float(x) for x in t.cpu()]

    def sum_counts(self, values: list[int]) -> list[int]:
        """Integer counts summed over the ranks (exact in float64 below 2**53)."""
        if self.world_size == 1:
            return values
        return [round(x) for x in self._sum([float(v) for v in values])]

    def reduce_step(self, res: StepLosses, n_tasks: int) -> StepLosses:
        """The step's losses, examples and tokens over all ranks (losses example-weighted)."""
        if self.world_size == 1:
            return res
        from bitblend.train.step import StepLosses

        vec = [0.0] * (2 * n_tasks + 1)
        for i, loss in res.losses.items():
            vec[i] = loss * res.examples[i]
            vec[n_tasks + i] = res.examples[i]
        vec[-1] = res.tokens
        tot = self._sum(vec)
        out = StepLosses(tokens=int(tot[-1]))
        for i in range(n_tasks):
            if tot[n_tasks + i] > 0:
                out.examples[i] = int(tot[n_tasks + i])
                out.losses[i] = tot[i] / tot[n_tasks + i]
        return out

    def mean_dict(self, values: dict[int, float], n: int) -> dict[int, float]:
        """Per-key mean over the ranks that hold the key (keys 0..n-1)."""
        if self.world_size == 1:
            return values
        vec = [0.0] * (2 * n)
        for i, v in values.items():
            vec[i], vec[n + i] = v, 1.0
        tot = self._sum(vec)
        return {i: tot[i] / tot[n + i] for i in range(n) if tot[n + i] > 0}

    def step_module(self, wrapped: Any, model: nn.Module, mixed: bool) -> Any:
        """What a step calls. DDP allows one forward per backward, so mixed batches (a
        forward per task, then one backward) run the bare model and `sync_grads` after."""
        return model if mixed and self.strategy == "ddp" else wrapped

    def sync_grads(self, model: nn.Module, mixed: bool) -> None:
        """Mixed batches under DDP: average the gradients over the ranks, one flat buffer
        per dtype. Every rank ran the same tasks (zero-weighted where it had no example),
        so the same parameters hold gradients everywhere."""
        if not (mixed and self.strategy == "ddp" and self.world_size > 1):
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in model.parameters():
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads).to(self.comm_device)
            dist.all_reduce(flat)
            flat /= self.world_size
            for g, new in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(new)

    def average_grads(self, params: list[torch.Tensor]) -> None:
        """Average `.grad` of parameters that live outside the wrapped model (balancers)."""
        if self.world_size == 1:
            return
        for p in params:
            if p.grad is not None:
                g = p.grad.to(self.comm_device)
                dist.all_reduce(g)
                p.grad.copy_(g / self.world_size)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (on every rank)."""
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (bounded by distributed.timeout_s)."""
        if self.active and self.world_size > 1:
            dist.barrier()

    # -- state that differs per rank -----------------------------------------------------
    def with_rank_rngs(self, rng: dict[str, Any]) -> dict[str, Any]:
        """Add every rank's CPU RNG state (dropout draws differ per rank) to `rng`."""
        if self.world_size == 1:
            return rng
        return {**rng, "ranks": self.gather(rng["torch"])}

    def own_rng(self, rng: dict[str, Any]) -> torch.Tensor:
        """This rank's saved CPU RNG state; rank 0's when the world size changed."""
        ranks = rng.get("ranks")
        if ranks is not None and len(ranks) == self.world_size:
            return torch.as_tensor(ranks[self.rank])
        return torch.as_tensor(rng["torch"])

    def local_state_bytes(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Bytes this rank holds of weights, gradients and optimizer states (shards only;
        the states counted by optim/lowbit.py's `state_bytes`, as the precision does)."""
        from bitblend.optim.lowbit import state_bytes

        total = 0
        for p in model.parameters():
            total += _local_nbytes(p) + (_local_nbytes(p.grad) if p.grad is not None else 0)
        return total + state_bytes(optimizer)


def _local_nbytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return int(local.numel() * local.element_size())


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers of the backbone: the longest ModuleList of same-class modules."""
    best: list[nn.Module] = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best):
            kinds = {type(m) for m in module}
            if len(kinds) == 1:
                best = list(module)
    return best


def shard_model(model: nn.Module, precision: Any, device_type: str, world: int) -> None:
    """fully_shard the fp32-kept modules, then every transformer block, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device_type, (world,))
    block_policy, fp32_policy = precision.fsdp_policies()
    # Innermost units first: an fp32 norm inside a block gets its own fp32 unit, so the
    # block's bf16 all-gather never casts it (the recipe's keep_fp32 rule survives sharding).
    for name in getattr(precision, "fp32_modules", []):
        sub = model.get_submodule(name)
        if any(True for _ in sub.parameters()):
            fully_shard(sub, mesh=mesh, mp_policy=fp32_policy)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=block_policy)
    fully_shard(model, mesh=mesh, mp_policy=block_policy)


def is_collective_failure(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer died, hung up or timed out."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(k in text for k in ("gloo", "nccl", "connection", "timed out", "timeout"))


def default_threads(local_world: int) -> int:
    """CPU threads per rank: this machine's cores shared evenly by the local ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world))


def elastic_store(timeout: timedelta, world: int, local_world: int) -> dist.Store | None:
    """torchrun's shared TCPStore, scoped to this restart round; None: let env:// build it.

    Since torch 2.5 torchrun's c10d rendezvous hosts one TCPStore in the agent and every
    worker of every restart round connects to it (TORCHELASTIC_USE_AGENT_STORE=True, the
    same MASTER_PORT each round), and env:// no longer prefixes keys per round
    (pytorch/pytorch#135712). So after `--max-restarts` restarts the workers, the dead
    round's gloo addresses (key `default_pg/0//cpu//0/<rank>`) are still in the store: a
    rank that reaches connectFullMesh before its peer has overwritten its key connects to
    the dead process's port ("connection refused"/connect timeout). Keys under
    `attempt_<TORCHELASTIC_RESTART_COUNT>/` are fresh in every round. The count is one
    agent's own, so it agrees between ranks only when one agent started them all (one
    machine); several machines must set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on every
    torchrun to get a fresh store per round (docs/distributed.md).
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if local_world != world:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) and os.environ.get("RANK") == "0":
            print(
                "bitblend: warning: torchrun --max-restarts on several machines shares one "
                "store between restart rounds (pytorch/pytorch#135712); set "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for every torchrun, or a restarted "
                "round may fail to connect",
                file=sys.stderr,
                flush=True,
            )
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
        is_master=False, timeout=timeout,
    )  # fmt: skip
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"bitblend/attempt_{attempt}", client)


def init(cfg: DistributedConfig, device_type: str) -> DistContext:
    """This process's DistContext, creating the process group once (idempotent).

    Under torchrun the group comes from its environment; ddp/fsdp2 outside torchrun run as
    a group of one (so an fsdp2 recipe and its checkpoints also work in one process).
    """
    global _CTX
    world = launched_world()
    strategy = resolve_strategy(cfg.strategy, world)
    if strategy == "none":
        return DistContext(cfg=cfg)  # no group: nothing to share or tear down
    if _CTX is not None:
        return _CTX
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    cuda = device_type == "cuda"
    comm = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(comm)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        timeout = timedelta(seconds=cfg.timeout_s)
        if world > 1 or "RANK" in os.environ:
            store = elastic_store(timeout, world, local_world)
            if store is None:
                dist.init_process_group(backend, timeout=timeout)  # env:// from torchrun
            else:
                dist.init_process_group(
                    backend, store=store, rank=rank, world_size=world, timeout=timeout
                )
        else:
            dist.init_process_group(
                backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout
            )
        atexit.register(teardown)
    _CTX = DistContext(
        strategy=strategy,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        cfg=cfg,
        owns_group=owns,
        comm_device=comm,
    )
    return _CTX


def setup(recipe: Recipe, device: torch.device) -> DistContext:
    """The Trainer's entry: context, recipe checks, and CPU threads per rank."""
    ctx = init(recipe.distributed, device.type)
    check_recipe(recipe, ctx.strategy, ctx.world_size)
    if ctx.active and device.type == "cpu" and not recipe.train.threads:
        torch.set_num_threads(default_threads(ctx.local_world_size))
    return ctx


def teardown() -> None:
    """Destroy the process group this module created (idempotent), every rank together.

    Why the barrier first: after the last collective, rank 0 alone saves the model, fits the
    baselines and writes the summary and the report, while the other ranks are done. A rank
    that destroyed its gloo group and exited while rank 0 was still at that work aborted now
    and then in C++ ("terminate called without an active exception", SIGABRT) and failed the
    job (seen in CI under a full test suite, always on local rank 1). So every rank waits
    for rank 0 (bounded by distributed.timeout_s) and they leave the group together."""
    global _CTX
    if _CTX is not None and _CTX.owns_group and dist.is_initialized():
        _CTX.barrier()
        dist.destroy_process_group()
    _CTX = None


def exit_rank(code: int) -> None:
    """End a torchrun rank's process now, once every rank is done (a barrier): flush what
    Python buffered and `os._exit(code)`, so neither destroy_process_group nor a C++
    static destructor runs. Nothing when this process created no group.

    Why: with `teardown` (barrier, then destroy_process_group, at exit) a rank still
    aborted now and then, with the run's outputs all written ("terminate called without an
    active exception", SIGABRT, local rank 1: 2 of ~6 clean-clone CI runs of
    tests/multiproc on 2026-12-02/03): a native thread of the group still joinable when
    its owner's destructor ran. The process is ending, so the group need not be taken
    apart; nothing is left to run (the trainer closed its sinks, rank 0 wrote the summary
    and the report)."""
    global _CTX
    if _CTX is None or not _CTX.owns_group or _CTX.world_size < 2:
        return
    if dist.is_initialized():
        _CTX.barrier()  # rank 0 may still be writing the model, summary and report
    _CTX = None
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe
            stream.flush()
    os._exit(code)


class NullSink:
    """Stands in for metrics.jsonl / TensorBoard on ranks other than 0."""

    def write(self, record: dict[str, Any]) -> None:
        """Drop the record."""

    def close(self) -> None:
        """Nothing to close."""
