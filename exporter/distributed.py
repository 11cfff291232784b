"""Several training processes through torch.distributed: `torchrun --nproc_per_node N exporter train ...` (or
LLaMA-Factory's launcher variables: FORCE_TORCHRUN=1, NNODES, NODE_RANK, NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT,
RDZV_ID, MIN_NNODES, MAX_NNODES, MAX_RESTARTS, and an automatic torchrun when more than one GPU is visible).

Existing engines only: DistributedDataParallel (default), FSDP2 (`fully_shard` per decoder layer, with `fsdp:`),
DeepSpeed (`deepspeed:`, where it is installed). Gloo on CPU, NCCL on GPUs. Every process reads and tokenizes the
same data and plans the same global batches; each takes its own rows of every batch, so no example is seen twice
and the loss equals one process with the same global batch. Only rank 0 writes, except that each rank writes its own
part of a sharded optimizer (FSDP, DeepSpeed) into rank 0's checkpoint staging dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from exporter.errors import UserError


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place in the group (world 1, rank 0 when not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def from_env() -> Dist:
    """The group torchrun describes in WORLD_SIZE / RANK / LOCAL_RANK."""
    return Dist(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")))  # fmt: skip


def init(timeout_s: int, group_of_one: bool = False) -> tuple[Dist, str]:
    """Join the process group (gloo on CPU, NCCL on CUDA); returns this process's place and its device.
    `group_of_one`: one process outside torchrun still gets a group of its own (DeepSpeed runs only inside one, and
    its own launcher makes one for a single GPU; without it DeepSpeed looks for MPI)."""
    import torch

    d = from_env()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and d.active:
        torch.cuda.set_device(d.local_rank)
        device = f"cuda:{d.local_rank}"
    if (d.active or group_of_one) and not torch.distributed.is_initialized():
        # before the group exists: torch.distributed.nn's and DeepSpeed's `group=...WORLD` defaults, evaluated at
        # their import, would otherwise hold the group until the interpreter exits (see shutdown); where DeepSpeed
        # is installed, transformers imports it whenever rank 0 saves a whole model (accelerate's unwrap_model)
        import torch.distributed.nn  # noqa: F401

        if importlib.util.find_spec("deepspeed") is not None:
            _import_deepspeed()

        backend = "nccl" if device.startswith("cuda") else "gloo"
        if not d.active:  # what a launcher of one process sets (DeepSpeed reads LOCAL_RANK itself)
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                               ("MASTER_PORT", str(_free_port()))):  # fmt: skip
                os.environ.setdefault(key, value)
        torch.distributed.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return d, device


def _import_deepspeed() -> Any:
    """DeepSpeed, told the accelerator when there is no GPU (else its import warns that it falls back to the CPU)."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def shutdown() -> None:
    """Leave the process group so that it is really gone, its gloo threads joined, while the interpreter is whole.
    Call it once the run's objects are released. `destroy_process_group` only unregisters the group: it lives on
    while anything holds it, and with FSDP2 DTensor's caches hold it (cached plans and sharding decisions keep the
    device mesh, the mesh keeps the group). A group alive at interpreter exit keeps gloo's threads running into
    finalization, where a rank can abort ("terminate called without an active exception") after a finished run.
    The run's DeepSpeed engines are let go here too, whether the run finished or failed (`_release_deepspeed`)."""
    import gc

    import torch

    _release_deepspeed()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    from torch.distributed.tensor import _collective_utils, _redistribute, _sharding_prop, debug

    _collective_utils.MeshTopoInfo.build_from_mesh.cache_clear()
    _redistribute.clear_redistribute_planner_cache()
    _redistribute._gen_transform_infos.cache_clear()
    _sharding_prop.ShardingPropagator._propagate_tensor_meta_cached.cache_clear()
    debug._clear_sharding_prop_cache()
    gc.collect()  # FSDP's module states and hooks form reference cycles
    ds = sys.modules.get("deepspeed.comm.comm")
    if ds is not None and ds.cdb is not None:  # DeepSpeed's groups, held in its module state, are released too
        ds.destroy_process_group()
    else:
        torch.distributed.destroy_process_group()


_deepspeed_engines: list[Any] = []  # the run's, released by `shutdown` however the run ended


def _release_deepspeed() -> None:
    """Let the run's DeepSpeed engines go with their process groups. `destroy()` (its optimizer's hooks hold the
    engine), then what DeepSpeed keeps in module state: ZeRO-3 appends the top module to its module-level forward
    stack and never takes it out, and its parameter coordinator keeps every module it released in a class-level
    `lru_cache`; the modules' forward hooks hold the engine, and it the groups."""
    while _deepspeed_engines:
        engine = _deepspeed_engines.pop()
        engine.destroy()
        offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
        if offload is not None:
            offload.FWD_MODULE_STACK[:] = [m for m in offload.FWD_MODULE_STACK if m is not engine.module]
        coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
        if coordinator is not None:  # the cached method is wrapped by DeepSpeed's NVTX decorator, no functools.wraps
            cls = coordinator.PartitionedParameterCoordinator
            method = vars(cls).get("_PartitionedParameterCoordinator__params_to_release")
            for cell in getattr(method, "__closure__", None) or ():
                if hasattr(cell.cell_contents, "cache_clear"):
                    cell.cell_contents.cache_clear()


# what gloo says in a collective when a peer process has gone (its socket closed)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_lost(d: Dist, e: BaseException) -> UserError | None:
    """The one line for a collective that failed because another process of the group stopped (it said why, or
    the launcher says it was killed); None for any other error. Under gloo the surviving ranks get a RuntimeError
    ("Connection closed by peer") before torchrun stops them: it was a traceback after the other rank's one line."""
    import torch

    if not d.active or isinstance(e, UserError) or not isinstance(e, RuntimeError):
        return None
    if not isinstance(e, torch.distributed.DistError) and not any(s in str(e) for s in _PEER_GONE):
        return None
    return UserError(f"training process {d.rank} stops: another training process of the run stopped and closed its "
                     "connection (its error says why)")  # fmt: skip


def barrier(d: Dist) -> None:
    if d.active:
        import torch

        torch.distributed.barrier()


def share(d: Dist, value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable Python object of our own making, never user data)."""
    if not d.active:
        return value
    import torch

    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_agree(d: Dist, ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank (a check all ranks must act on alike). An object
    collective, which torch stages on the backend's device: a CPU tensor has no backend in an NCCL group."""
    if not d.active:
        return ok
    import torch

    oks: list[Any] = [None] * d.world
    torch.distributed.all_gather_object(oks, bool(ok))
    return all(oks)


def gather(d: Dist, value: Any) -> list[Any] | None:
    """Every rank's `value` (a picklable object of our own making) as a list on rank 0, None on the others."""
    if not d.active:
        return [value]
    import torch

    out = [None] * d.world if d.main else None
    torch.distributed.gather_object(value, out, dst=0)
    return out


def all_sum(d: Dist, t: Any) -> Any:
    """Element-wise sum over the group (in place; returns the tensor)."""
    if d.active:
        import torch

        torch.distributed.all_reduce(t)
    return t


def rows(d: Dist, batch: list[int]) -> list[int]:
    """This rank's rows of a global batch: every world-th example, so lengths stay balanced across ranks."""
    return batch[d.rank :: d.world]


def load_on_main(d: Dist, load: Callable[[bool], Any]) -> Any:
    """FSDP: the model read by rank 0 alone (`load(False)`); the others build it empty on the meta device
    (`load(True)`) and `wrap` fills their shards from rank 0's weights, so the host holds one copy of the model, not
    one per process (accelerate's cpu_ram_efficient_loading). A rank that fails makes every rank fail. Every rank
    goes on from rank 0's random state (LoRA's initialization drew on it), as if each had loaded the model itself."""
    import torch

    model = _on_every_rank(d, lambda: load(not d.main), "another process could not load the model")
    torch.set_rng_state(share(d, torch.get_rng_state()))
    return model


def _fill_from_main(score: Any, full: dict[str, Any], d: Dist, device: str, offload: bool) -> None:
    """Each rank's FSDP shards, and every buffer, from rank 0's weights (`full`, its state dict before sharding;
    empty elsewhere): torch sends them tensor by tensor and each rank keeps its shard. The other ranks first give
    their empty model storage where rank 0's is: shards on the device (on the CPU with `offload`), buffers on the
    device, as fully_shard placed rank 0's."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not d.main:
        score.to_empty(device="cpu" if offload else device)
        for module in score.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != torch.device(device):
                    module._buffers[name] = buf.to(device)
    set_model_state_dict(score, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for module in score.modules():  # non-persistent buffers (rotary tables) are in no state dict
        for buf in module._buffers.values():
            if buf is not None:
                torch.distributed.broadcast(buf.view(torch.uint8) if buf.dtype == torch.bool else buf, src=0)


def wrap(score: Any, model: Any, cfg: Any, d: Dist, device: str, from_main: bool = False) -> Any:
    """The scorer (see `tuning.scorer`) as DDP, or sharded with FSDP2 when `fsdp` is set; unchanged alone.
    `from_main`: only rank 0 holds the weights (`load_on_main`); every rank's shards come from it."""
    import torch

    if not d.active:
        return score
    if cfg.fsdp:
        from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

        kw: dict[str, Any] = {"reshard_after_forward": "shard_grad_op" not in cfg.fsdp}
        if "offload" in cfg.fsdp:  # pinned host memory is for copies to a GPU (on a CPU, torch cannot pin)
            kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device.startswith("cuda"))
        full = score.state_dict() if from_main and d.main else {}
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        for layer in base.get_decoder().layers:
            fully_shard(layer, **kw)
        fully_shard(score, **kw)
        if from_main:
            _fill_from_main(score, full, d, device, "offload" in cfg.fsdp)
        return score
    # frozen weights are identical on every rank (same files): skip broadcasting and bucketing them
    frozen = [n for n, p in score.named_parameters() if not p.requires_grad]
    score._ddp_params_and_buffers_to_ignore = frozen
    ids = [int(device.split(":")[1])] if device.startswith("cuda") else None
    return torch.nn.parallel.DistributedDataParallel(
        score,
        device_ids=ids,
        find_unused_parameters=False,
        forward_sync_buffers=False,  # buffers (rotary tables): identical on every rank
    )


def unwrapped(score: Any) -> Any:
    """The scorer inside a DDP wrapper (for forwards without gradients and for saving)."""
    return getattr(score, "module", score)


def on_main(d: Dist, fn: Callable[[], Any], everywhere: bool = True) -> Any:
    """`fn()` on rank 0 (e.g. preparing the output dir), its result on every rank (`everywhere` False: on rank 0
    only, None on the others); its UserError on every rank."""
    if not d.active:
        return fn()
    value, error = None, None
    if d.main:
        try:
            value = fn()
        except UserError as e:
            error = str(e)
    if everywhere:
        value, error = share(d, (value, error))
    else:
        error = share(d, error)
    if error is not None:
        raise UserError(error)
    return value


# save_pretrained's max_shard_size default
_SHARD_BYTES = 50 * 10**9


def _zero3(run: Any) -> bool:
    return run.engine == "deepspeed" and run.score.zero_optimization_partition_weights()


def _sharded(run: Any) -> bool:
    """Whether the ranks hold only shards of the weights (FSDP, DeepSpeed ZeRO-3)."""
    return run.engine == "fsdp" or _zero3(run)


def _saved(run: Any) -> list[tuple[str, Any]]:
    """What the saved weights hold, in order, each a (maybe sharded) parameter or a buffer: a LoRA run's trained
    weights (its adapter: never the possibly huge or 4-bit packed base); otherwise every parameter once (a tied one
    under its first name, the one save_pretrained keeps) and the buffers the state dict has."""
    model = run.model
    if run.cfg.finetuning_type == "lora":
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    keys = set(model.state_dict().keys()) - set(getattr(model, "_keys_to_ignore_on_save", None) or ())
    buffers = [(k, b) for k, b in model.named_buffers(remove_duplicate=False) if k in keys]
    return [(n, p) for n, p in model.named_parameters() if n in keys] + buffers


def whole_shape(t: Any) -> tuple[int, ...]:
    """A parameter's whole shape, also where this process holds only its shard: ZeRO-3 keeps it as `ds_shape`
    (its own shape is its empty placeholder's), a DTensor's shape is the whole one."""
    return tuple(getattr(t, "ds_shape", t.shape))


def _gathered(run: Any, t: Any) -> Any:
    """`t` whole, on rank 0's CPU (None on the others); every rank takes part when it is sharded."""
    if hasattr(t, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
            return t.detach().to("cpu", copy=True) if run.dist.main else None
    if hasattr(t, "full_tensor"):
        whole = t.full_tensor()
        return whole.detach().cpu() if run.dist.main else None
    return t.detach().to("cpu", copy=True) if run.dist.main else None


def local_part(t: Any, d: Dist) -> Any:
    """This rank's part of a parameter: its FSDP shard, its ZeRO-3 partition (without the padding DeepSpeed leaves
    uninitialised at the end of the last one), or the whole tensor where it is not sharded."""
    if hasattr(t, "to_local"):
        return t.to_local()
    if hasattr(t, "ds_tensor"):
        part = t.ds_tensor
        return part.narrow(0, 0, max(0, min(part.numel(), t.ds_numel - d.rank * part.numel())))
    return t


def full_state_dict(run: Any) -> dict[str, Any] | None:
    """The saved weights (`_saved`) gathered whole on rank 0 when FSDP or ZeRO-3 shards them (every rank takes part;
    None on the others); None when the model in memory is already whole. One tensor at a time: never the whole
    model on a rank but rank 0, which holds what is saved: a LoRA run's adapter, or a whole model that cannot be
    streamed (`weights_writer`)."""
    if not _sharded(run):
        return None
    sd = {name: _gathered(run, t) for name, t in _saved(run)}
    return sd if run.dist.main else None


def _saved_as_held(model: Any, planned: list[Any]) -> bool:
    """Whether save_pretrained writes these tensors as the model holds them: it reverts weight conversions made on
    loading (MoE experts fused into one tensor, renamed keys) over the whole state dict; tried on meta tensors."""
    import torch

    try:
        from transformers.core_model_loading import revert_weight_conversion

        meta = {t.name: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in planned}
        out = revert_weight_conversion(model, dict(meta))
    except Exception:  # noqa: BLE001 - a conversion that cannot run on meta tensors is one that changes them
        return False
    return out.keys() == meta.keys() and all(out[k] is meta[k] for k in out)


def weights_writer(run: Any, bar: bool = False) -> Callable[[Path | None], None] | None:
    """Full and freeze runs whose weights FSDP or ZeRO-3 shard: a writer of the model's safetensors that every rank
    calls at the same point, rank 0 with its staging dir, the others with None. Tensor by tensor, each is gathered
    whole to rank 0 and appended to its shard at once, so no rank ever holds the whole model (HF's Trainer gathers
    it into rank 0's memory). None where the model is whole in memory, for LoRA (its adapter is gathered:
    `full_state_dict`), and where save_pretrained converts weights (`_saved_as_held`). `bar`: rank 0 shows its
    progress (not under the training loop's bar)."""
    from exporter.progress import progress
    from exporter.shards import PlannedTensor, ShardWriter, write_shards

    if run.cfg.finetuning_type == "lora" or not _sharded(run):
        return None
    saved = _saved(run)
    planned = [PlannedTensor(name, t.dtype, whole_shape(t)) for name, t in saved]
    if not _saved_as_held(run.model, planned):
        return None

    def write(tmp: Path | None) -> None:
        tensors = (_gathered(run, t) for _, t in saved)

        def mine() -> None:
            with progress("save", "tensors", len(planned), show=bar and run.dist.main) as advance:

                def fill(_: PlannedTensor, writer: ShardWriter) -> None:
                    writer.write(next(tensors))
                    advance()

                try:
                    if tmp is not None:
                        write_shards(tmp, planned, _SHARD_BYTES, fill)
                finally:  # the other ranks gather to the end, whatever rank 0 did with it
                    for _ in tensors:
                        pass

        _on_every_rank(run.dist, mine, "another process could not write the model's weights; nothing was saved")

    return write


def full_optimizer_state(run: Any) -> dict[str, Any] | None:
    """The optimizer's state for a checkpoint, on rank 0 (every rank takes part; None on the others): one process's
    state dict; under DDP the whole state gathered by torch (keyed by parameter name). Not a sharded one's (FSDP,
    DeepSpeed): each of its ranks writes its own part (`optimizer_part`, `write_parts`)."""
    if run.engine == "single":
        return run.opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    sd = get_optimizer_state_dict(run.plain, run.opt, options=opts)
    return sd if run.dist.main else None


def optimizer_part(run: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """This rank's part of a sharded optimizer for its checkpoint: DeepSpeed's as it holds it (`deepspeed_part`), or
    FSDP's by parameter name, each state tensor this rank's shard (as torch's sharded optimizer state dict has it)."""
    if run.engine == "deepspeed":
        return deepspeed_part(run.score)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from exporter import checkpoint

    sd = get_optimizer_state_dict(run.plain, run.opt, options=StateDictOptions(full_state_dict=False))
    return checkpoint.optimizer_tensors(sd)


def _on_every_rank(d: Dist, fn: Callable[[], Any], elsewhere: str) -> Any:
    """`fn()` on every rank (all call it together); where it failed on any rank, every rank raises: its own error, or
    a UserError saying `elsewhere`. Returns this rank's result."""
    value, error = None, None
    try:
        value = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after every rank has heard of it
        error = e
    if not all_agree(d, error is None):
        raise error or UserError(elsewhere)
    return value


def _read_own_part(path: Any, d: Dist) -> tuple[dict[str, Any], dict[str, str]]:
    """This rank's optimizer part of checkpoint-N, read by every rank for itself (after rank 0 checked the manifest,
    which lists every rank's part); a rank that cannot makes all fail."""
    from exporter import checkpoint

    elsewhere = f"resume_from_checkpoint {path}: another process could not read its optimizer part"
    return _on_every_rank(d, lambda: checkpoint.read_part(path, d.rank), elsewhere)


def _sharded_optimizer_state(run: Any, part: tuple[dict[str, Any], dict[str, str]], path: Any) -> dict[str, Any]:
    """An FSDP rank's saved part as torch's sharded optimizer state dict: each tensor shaped like its parameter's
    shard becomes a DTensor placed as the parameter is (the scalar `step` stays as it is)."""
    from torch.distributed.tensor import DTensor

    from exporter import checkpoint

    try:
        sd = checkpoint.optimizer_state(*part)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"resume_from_checkpoint {path}: its optimizer part is unreadable ({e})") from None
    params = dict(run.plain.named_parameters())
    for name, st in sd["state"].items():
        p = params.get(name)
        if not isinstance(p, DTensor):
            raise UserError(f"resume_from_checkpoint {path}: its optimizer has state for {name}, which this run does "
                            "not shard; resume with the settings it was saved with")  # fmt: skip
        local = p.to_local()
        for key, v in st.items():
            if getattr(v, "dim", lambda: 0)() == 0:
                continue
            if v.shape != local.shape:
                raise UserError(f"resume_from_checkpoint {path}: its optimizer's {name}.{key} is {list(v.shape)} on "
                                f"process {run.dist.rank}, this run's shard {list(local.shape)}")  # fmt: skip
            st[key] = DTensor.from_local(v.to(local.device), p.device_mesh, p.placements, shape=p.shape,
                                         stride=p.stride())  # fmt: skip
    return sd


def write_parts(d: Dist, tmp: Path | None, write: Callable[[Path], None]) -> None:
    """Every rank writes its own files (`write`) into rank 0's staging dir `tmp` (None on the others), so no rank's
    state travels through another's memory; all ranks call it together. The dir must be one every node sees, as for
    DeepSpeed's own checkpoints. A rank that fails makes every rank fail (rank 0's staging dir is then removed)."""
    where = Path(share(d, str(tmp) if d.main else None))

    def mine() -> None:
        try:
            write(where)
        except OSError as e:  # rank 0's goes to its staging dir's handler (a full disk, said in one line)
            if d.main:
                raise
            hint = " (output_dir must be a directory every node sees)" if e.errno == errno.ENOENT else ""
            raise UserError(f"process {d.rank} cannot write {e.filename or where}: {e.strerror}{hint}") from None

    _on_every_rank(d, mine, f"{where.name}: another process could not write its part; nothing was saved")


def restore(path: Any, cfg: Any, run: Any) -> dict[str, Any]:
    """Resume a DDP/FSDP run from checkpoint-N: rank 0 checks and reads the files (`checkpoint.read`: safetensors and
    JSON only), torch's loaders broadcast the weights and optimizer state from it into every rank's shards, and
    each rank takes its own RNG state. Returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    d = run.dist

    def named(saved: Any) -> None:  # older versions saved the optimizer of several processes by parameter index
        if saved.parts:
            if run.engine != "fsdp":
                raise UserError(f"resume_from_checkpoint {path}: its optimizer is sharded by process (an FSDP run); "
                                "resume it with fsdp set as it was")  # fmt: skip
            return
        groups = saved.optimizer["param_groups"] if saved.optimizer else []
        if saved.optimizer is None or any(isinstance(p, int) for g in groups for p in g["params"]):
            raise UserError(f"resume_from_checkpoint {path}: written by an older version of exporter for "
                            f"{d.world} processes; resume it with that version or start over")  # fmt: skip

    saved = _read_on_main(path, cfg, run, named)
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    weights = {f"model.{k}": v for k, v in saved.weights.items()} if d.main else {}  # the Scorer holds it as `model`
    set_model_state_dict(run.plain, weights, options=opts)
    if share(d, saved.parts if d.main else None):  # FSDP's: each rank its own shards
        sharded = _sharded_optimizer_state(run, _read_own_part(path, d), path)
        set_optimizer_state_dict(run.plain, run.opt, sharded, options=StateDictOptions(full_state_dict=False))
    else:  # a whole state (DDP's, or an FSDP run's saved by an earlier version): into every rank's shards
        set_optimizer_state_dict(run.plain, run.opt, saved.optimizer if d.main else {}, options=opts)
    return _resume_rest(run, saved)


def _read_on_main(path: Any, cfg: Any, run: Any, check: Callable[[Any], None] = lambda saved: None) -> Any:
    """checkpoint-N checked (`check` too) and read on rank 0 (`checkpoint.read`: safetensors and JSON only), its
    weights under the model's own names; None on the other ranks, a UserError on every rank."""
    from exporter import checkpoint

    def read() -> Any:
        saved = checkpoint.read(path, cfg, run.model, run.state.fingerprint)
        check(saved)
        return dataclasses.replace(saved, weights=checkpoint.by_model_key(path, run.model, saved.weights, cfg))

    return on_main(run.dist, read, everywhere=False)


def _resume_rest(run: Any, saved: Any) -> dict[str, Any]:
    """Every rank takes the scheduler and its own RNG state from what rank 0 read; returns the trainer state."""
    from exporter import checkpoint

    d = run.dist
    state, sched, rng = share(d, (saved.state, saved.scheduler, saved.rng) if d.main else None)
    run.sched.load_state_dict(sched)
    checkpoint.set_rng(*rng[d.rank])
    return state


# the counters of DeepSpeed's dynamic fp16 loss scaler (the rest comes from its config)
DEEPSPEED_LOSS_SCALE = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _deepspeed_scaler(run: Any) -> Any:
    scaler = getattr(getattr(run.score, "optimizer", None), "loss_scaler", None) if run.engine == "deepspeed" else None
    return scaler if getattr(scaler, "dynamic", False) else None


def loss_scale(run: Any) -> dict[str, Any] | None:
    """fp16's dynamic loss scale for a checkpoint (the same on every rank): torch's GradScaler state, or DeepSpeed's
    loss scaler counters; None without one. Without it a resumed run would start again at 65536 and skip updates."""
    if run.scaler is not None:
        return run.scaler.state_dict()
    scaler = _deepspeed_scaler(run)
    return {k: getattr(scaler, k) for k in DEEPSPEED_LOSS_SCALE} if scaler is not None else None


# what torch's GradScaler.state_dict() holds
TORCH_LOSS_SCALE = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


def set_loss_scale(run: Any, state: Any, path: Any) -> None:
    """Put checkpoint-N's loss scale (`loss_scale`) back; nothing when it has none (not fp16, or an older one). Its
    values must be finite numbers (torch's GradScaler takes any value: with a NaN scale a run trained on silently)."""
    import math

    scaler = run.scaler if run.scaler is not None else _deepspeed_scaler(run)
    if not state or scaler is None:
        return
    keys = TORCH_LOSS_SCALE if run.scaler is not None else DEEPSPEED_LOSS_SCALE
    bad = next((k for k in keys if not isinstance(state, dict) or type(state.get(k)) not in (int, float)
                or not math.isfinite(state[k])), None)  # fmt: skip
    if bad is not None:
        raise UserError(f"resume_from_checkpoint {path}: trainer_state.json: loss_scale.{bad} must be a finite number, "
                        f"got {state.get(bad) if isinstance(state, dict) else state!r}")  # fmt: skip
    if run.scaler is not None:
        run.scaler.load_state_dict(state)
    else:
        for key in keys:
            setattr(scaler, key, state[key])


# where each DeepSpeed optimizer keeps the flat fp32 tensors its torch optimizer steps: this rank's master weights
DEEPSPEED_FLATS = (
    "fp32_partitioned_groups_flat",  # ZeRO-3
    "single_partition_of_fp32_groups",  # ZeRO-1/2
    "fp32_groups_flat_partition",  # bf16 without ZeRO
)


def _flats(engine: Any) -> tuple[Any, list[Any]]:
    """DeepSpeed's torch optimizer (ours, which it wraps) and the flat tensors it steps on this rank; without a
    wrapper (ZeRO-0 in fp32) the trained parameters themselves."""
    zo = engine.optimizer
    for attr in DEEPSPEED_FLATS:
        if hasattr(zo, attr):
            return zo.optimizer, list(getattr(zo, attr))
    return zo, [p for g in zo.param_groups for p in g["params"]]


def deepspeed_part(engine: Any) -> tuple[dict[str, Any], dict[str, str]]:
    """This rank's part of a DeepSpeed run's optimizer, as DeepSpeed holds it: per flat tensor `<i>.master` (the
    fp32 master weights) and its AdamW state (`<i>.exp_avg`, `<i>.exp_avg_sq`, `<i>.step`); the param groups'
    settings (the scheduler's current lr) in the metadata. Safetensors, unlike DeepSpeed's own checkpoints (pickles);
    a resume needs the same ZeRO stage and processes (the fingerprint says so)."""
    import torch

    opt, flats = _flats(engine)
    tensors = {}
    for i, flat in enumerate(flats):
        tensors[f"{i}.master"] = flat.detach().cpu().clone()
        for key, v in opt.state.get(flat, {}).items():
            tensors[f"{i}.{key}"] = torch.as_tensor(v).detach().cpu().clone()
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]  # lr, betas, ...
    meta = {"param_groups": json.dumps(groups), "flats": str(len(flats))}
    return tensors, meta | {"deepspeed_zero_stage": str(engine.zero_optimization_stage())}


def restore_deepspeed(path: Any, cfg: Any, run: Any) -> dict[str, Any]:
    """Resume a DeepSpeed run from checkpoint-N: rank 0 checks and reads it (safetensors and JSON only), the trained
    weights go from rank 0 into every rank's parameters (ZeRO-3: into their shards, through DeepSpeed's
    GatheredParameters), each rank reads its own optimizer part (master weights and AdamW state) and gets the
    scheduler and its RNG state. Returns the trainer state."""
    import deepspeed
    import torch

    from exporter import checkpoint

    d, engine = run.dist, run.score
    saved = _read_on_main(path, cfg, run)
    zero3 = engine.zero_optimization_stage() == 3
    for name, p in [(n, p) for n, p in run.model.named_parameters() if p.requires_grad]:
        # one at a time, so a ZeRO-3 model is never whole; its context spreads rank 0's value to the shards
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=zero3), torch.no_grad():
            if d.main:
                p.copy_(saved.weights[name])
        if d.active and not zero3:
            torch.distributed.broadcast(p.data, src=0)
    tensors, meta = _read_own_part(path, d)
    opt, flats = _flats(engine)
    fits = meta.get("flats") == str(len(flats)) and all(
        f"{i}.master" in tensors and tensors[f"{i}.master"].shape == f.shape for i, f in enumerate(flats))  # fmt: skip
    if not all_agree(d, fits):
        raise UserError(f"resume_from_checkpoint {path}: its optimizer was partitioned otherwise (DeepSpeed's "
                        "bucket or sub-group sizes changed); resume with the config it was saved with")  # fmt: skip
    groups = checkpoint.param_groups(meta["param_groups"])
    if len(groups) != len(opt.param_groups):
        raise UserError(f"resume_from_checkpoint {path}: its optimizer has {len(groups)} parameter groups, this run "
                        f"{len(opt.param_groups)}; resume with the settings it was saved with")  # fmt: skip
    for group, saved_group in zip(opt.param_groups, groups, strict=True):  # the scheduler's lr as it left it
        group.update(saved_group)
    on_device = bool(opt.defaults.get("fused") or opt.defaults.get("capturable"))  # else AdamW keeps `step` on the CPU
    for i, flat in enumerate(flats):
        with torch.no_grad():
            flat.copy_(tensors[f"{i}.master"])
        keys = {k.split(".", 1)[1] for k in tensors if k.startswith(f"{i}.") and k != f"{i}.master"}
        opt.state[flat] = {k: tensors[f"{i}.{k}"].to(flat.device if k != "step" or on_device else "cpu") for k in keys}
    return _resume_rest(run, saved)


def deepspeed_config(cfg: Any, d: Dist, model_dir: Path) -> dict[str, Any]:
    """The user's DeepSpeed JSON with HF's "auto" values filled from the training keys (batch sizes, accumulation,
    clipping, bf16/fp16, bucket sizes from the model's hidden size), checked before the model loads."""
    try:
        _import_deepspeed()
    except ImportError:
        raise UserError(f"deepspeed: {cfg.deepspeed}: the deepspeed package is not installed (pip install "
                        "deepspeed), or use fsdp: full_shard") from None  # fmt: skip
    from exporter.config import read_json

    ds = read_json(cfg.deepspeed)
    if not isinstance(ds, dict):
        raise UserError(f"deepspeed: {cfg.deepspeed}: expected a JSON object (a DeepSpeed config)")
    config = read_json(Path(model_dir) / "config.json", optional=True)
    hidden = config.get("hidden_size") or (config.get("text_config") or {}).get("hidden_size") or 0
    auto = {
        "train_micro_batch_size_per_gpu": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "train_batch_size": cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * d.world,
        "gradient_clipping": cfg.max_grad_norm, "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden,
    }  # fmt: skip

    def fill(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: (auto[k] if v == "auto" and k in auto else fill(v)) for k, v in node.items()}
        return node

    ds = fill(ds)
    for key, on in (("bf16", cfg.bf16), ("fp16", cfg.fp16)):  # DeepSpeed's mixed precision is the training key's
        section = ds.setdefault(key, {"enabled": on}) if on else ds.get(key, {})  # as accelerate adds it
        enabled = section.get("enabled", False) if isinstance(section, dict) else section
        if enabled == "auto":
            section["enabled"] = on
        elif str(enabled).lower() != str(on).lower():
            raise UserError(f"deepspeed: {cfg.deepspeed}: {key}.enabled is {enabled} but {key} is {on} in the "
                            f'training settings; make them agree or write "auto"')  # fmt: skip
    left = [k for k, v in _walk(ds) if v == "auto"]
    if left:
        raise UserError(f'deepspeed: {cfg.deepspeed}: cannot fill "auto" for {", ".join(left)}; give values')
    offload = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    if offload.get("device") == "nvme" and not cfg.save_only_model:
        raise UserError(f"deepspeed: {cfg.deepspeed}: offload_optimizer to nvme keeps the optimizer state out of "
                        "memory, where checkpoints read it; offload to cpu, or set save_only_model: true")  # fmt: skip
    from deepspeed.accelerator import get_accelerator

    if cfg.fp16 and not get_accelerator().is_fp16_supported():
        raise UserError(f"deepspeed: {cfg.deepspeed}: fp16: DeepSpeed has no fp16 on this device "
                        f"({get_accelerator().device_name()}); use bf16: true, or fp16 without deepspeed")  # fmt: skip
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # our AdamW, also with offloading
    return ds


@contextlib.contextmanager
def zero3_loading(ds: dict[str, Any] | None, cfg: Any) -> Iterator[bool]:
    """Under ZeRO-3 the model loads straight into its partitions, as HF's Trainer and LLaMA-Factory load it:
    while this config is registered, transformers builds the model under `deepspeed.zero.Init`, rank 0 reads the
    checkpoint and each layer is gathered, filled and partitioned in turn, so no GPU holds the whole model. Not for
    QLoRA (bitsandbytes quantizes where it loads; transformers skips zero.Init for it). Yields whether it is on; the
    registration ends with the block, so later loads in the process (a checkpoint's weights on rank 0) are plain."""
    if ds is None or (ds.get("zero_optimization") or {}).get("stage") != 3 or cfg.quantization_bit:
        yield False
        return
    from deepspeed.accelerator import get_accelerator
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from exporter.quiet import prints_dropped

    with prints_dropped():  # zero.Init reads the group's size from DeepSpeed's view of it, as its engine will
        _import_deepspeed().init_distributed(dist_backend=get_accelerator().communication_backend_name())
    registered = HfDeepSpeedConfig(ds)  # transformers keeps a weak reference to it
    try:
        yield True
    finally:
        del registered
        unset_hf_deepspeed_config()


def deepspeed_engine(score: Any, opt: Any, ds: dict[str, Any]) -> Any:
    """DeepSpeed's engine around the scorer, from the filled config (`deepspeed_config`)."""
    from exporter.quiet import prints_dropped

    deepspeed = _import_deepspeed()
    with prints_dropped():  # on CPU it prints that it built its shared-memory op
        engine, _, _, _ = deepspeed.initialize(model=score, optimizer=opt, config=ds)
    _deepspeed_engines.append(engine)
    return engine


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in _walk(v, f"{path}.{k}" if path else k)]
    return [(path, node)]


# ------------------------------------------------------------------ launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(argv: list[str], flags: Sequence[str] = ()) -> int | None:
    """LLaMA-Factory's launcher rule: with FORCE_TORCHRUN=1, or more than one visible GPU, run this same command
    (`exporter [flags] train argv`: flags such as --verbose go to every rank) under torchrun (NNODES, NODE_RANK,
    NPROC_PER_NODE, MASTER_ADDR, MASTER_PORT; with RDZV_ID an elastic launch, `_elastic`); returns its exit code, or
    None when this process should train itself (already under torchrun, or one device)."""
    if "LOCAL_RANK" in os.environ:
        return None
    force = os.environ.get("FORCE_TORCHRUN", "").lower() in ("1", "true", "y", "yes")  # LF's is_env_enabled, + yes
    gpus = _gpu_count()
    if not force and gpus <= 1:
        return None
    nproc = os.environ.get("NPROC_PER_NODE", str(max(gpus, 1)))
    nnodes, node_rank = os.environ.get("NNODES", "1"), os.environ.get("NODE_RANK", "0")
    if not nproc.isdigit() or int(nproc) < 1:
        raise UserError(f"NPROC_PER_NODE must be a positive number of processes, got {nproc!r}")
    if not nnodes.isdigit() or int(nnodes) < 1 or not node_rank.isdigit() or int(node_rank) >= int(nnodes):
        raise UserError(f"NNODES={nnodes!r}, NODE_RANK={node_rank!r}: expected NNODES nodes numbered 0 to NNODES-1")
    rdzv = _elastic(nnodes)  # LF's elastic launch: RDZV_ID, MIN_NNODES / MAX_NNODES, MAX_RESTARTS
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if int(rdzv[1].split(":")[-1] if rdzv else nnodes) > 1 and missing:  # else each node waits for good
        raise UserError(f"NNODES={rdzv[1] if rdzv else nnodes}: {' and '.join(missing)} not set; every node needs the "
                        "same MASTER_ADDR (node 0's address) and MASTER_PORT (a free port there)")  # fmt: skip
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT") or str(_free_port())
    if rdzv:  # as LLaMA-Factory launches it: a c10d rendezvous at MASTER_ADDR:MASTER_PORT, nodes rank themselves
        where = ["--nnodes", rdzv[1], "--nproc_per_node", nproc, "--rdzv_id", rdzv[0], "--rdzv_backend", "c10d",
                 "--rdzv_endpoint", f"{addr}:{port}", "--max_restarts", rdzv[2]]  # fmt: skip
    else:
        where = ["--nnodes", nnodes, "--node_rank", node_rank, "--nproc_per_node", nproc, "--master_addr", addr,
                 "--master_port", port]  # fmt: skip
    args = [*where, "-m", "exporter", *flags, "train", *argv]
    # torchrun gives each process 1 OpenMP thread when none is set, with a banner saying so: share the cores out
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    print(f"note: launching {nproc} training processes per node with torchrun", file=sys.stderr)
    return _torchrun(args)


def _elastic(nnodes: str) -> tuple[str, str, str] | None:
    """LLaMA-Factory's elastic launch when RDZV_ID is set: (rendezvous id, nodes — `MIN_NNODES:MAX_NNODES` when both
    are set, else NNODES —, MAX_RESTARTS); None without RDZV_ID (LF then ignores the other three too)."""
    rdzv_id = os.environ.get("RDZV_ID")
    if rdzv_id is None:
        return None
    restarts, low, high = (os.environ.get(k) for k in ("MAX_RESTARTS", "MIN_NNODES", "MAX_NNODES"))
    restarts = restarts or "0"
    if not restarts.isdigit():
        raise UserError(f"MAX_RESTARTS must be a number of restarts (0 or more), got {restarts!r}")
    if low is None or high is None:
        return rdzv_id, nnodes, restarts
    if not low.isdigit() or not high.isdigit() or not 1 <= int(low) <= int(high):
        raise UserError(f"MIN_NNODES={low!r}, MAX_NNODES={high!r}: expected node counts with 1 <= MIN_NNODES <= "
                        "MAX_NNODES")  # fmt: skip
    return rdzv_id, f"{low}:{high}", restarts


def _torchrun(args: list[str]) -> int:
    """torchrun (`torch.distributed.run`) run here, on `args`; its exit code: a failed rank's, which has said why
    in one line (a rank killed by a signal is said here), or 128 + the signal that stopped the launcher (Ctrl-C:
    130, as one process exits). The launcher's own failure log and report, a traceback, are kept out of normal
    output (`--verbose` shows them)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from exporter import quiet

    quiet.launcher()
    try:
        run(parse_args(args))
    except SignalException as e:  # Ctrl-C (or a kill) of this launcher: it stopped every rank with the same signal
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if quiet.verbose():
            print(str(e), file=sys.stderr)
        if failure.exitcode < 0:
            print(f"error: training process {rank} was killed ({failure.signal_name()})", file=sys.stderr)
            return 128 - failure.exitcode
        return failure.exitcode
    return 0


def _gpu_count() -> int:
    """Visible CUDA devices, without importing torch when there is no NVIDIA driver at all."""
    if shutil.which("nvidia-smi") is None:
        return 0
    import torch

    return torch.cuda.device_count()
