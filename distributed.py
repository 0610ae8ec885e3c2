"""The process group and FSDP2, for both trainers: joining (torchrun or a group of one), stopping every rank
together on an error, checking that OUT is shared, resolving a hub id once per node, sharding the model, loading a
checkpoint straight into shards (no process ever holds the whole model), and gathering it back for saving."""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import checkpoint as CK
import model as M


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> Dist:
    """Join torchrun's process group, or make a group of one (plain `python`): FSDP runs the same either way.

    NCCL on GPU, gloo on CPU (FSDP2's all-gather and reduce-scatter work on gloo in torch >= 2.6)."""
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=dev if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def teardown_distributed(ok: bool = True):
    """Leave the process group. ok=False after an error: no barrier, as the other ranks may never reach it."""
    if dist.is_initialized():
        if ok:
            dist.barrier()  # gloo can abort at exit when one rank tears down while another still talks
        dist.destroy_process_group()


def gather_objects(d: Dist, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def reduce_dict(d: Dist, values: dict, op: str = "sum") -> dict:
    """{name: value summed (op "sum") or maxed ("max") over ranks}, in float64: numbers reduced by name."""
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return dict(zip(keys, t.tolist()))


def stop_together(d: Dist, err: str | None):
    """SystemExit on every rank when any rank met an error (`err`): no rank is left waiting in a collective."""
    errs = gather_objects(d, err)
    if any(errs):
        raise SystemExit(next(e for e in errs if e))


def check_out_shared(out: str, d: Dist):
    """Every rank must see what rank 0 writes in OUT: a checkpoint holds files from every rank, and --resume reads
    it on every rank. A multi-node run whose OUT is not one shared file system would fail late, or hang in a
    collective that only some ranks enter; this stops every rank at start instead, saying so."""
    probe = os.path.join(out, f".shared-check-{os.getpid()}")  # as each rank will resolve OUT, relative or not
    token, err = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}", None
    if d.main:
        try:
            os.makedirs(out, exist_ok=True)
            with open(probe, "w") as f:
                f.write(token)
        except OSError as e:
            err = f"--out {out}: cannot write there ({e})"
    stop_together(d, err)
    box = [probe, token]
    dist.broadcast_object_list(box, src=0)
    for attempt in range(5):  # a shared file system may show a new file a moment late (attribute caching)
        try:
            with open(box[0]) as f:
                seen = f.read() == box[1]
        except OSError:
            seen = False
        if seen or attempt == 4:
            break
        time.sleep(1)
    views = gather_objects(d, (seen, socket.gethostname()))
    if d.main:
        os.remove(probe)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]
    if blind:
        raise SystemExit(f"--out {out}: {', '.join(blind)} cannot see the files rank 0 writes there. A run on "
                         f"several nodes needs OUT on a file system that every node mounts at the same path (NFS, "
                         f"Lustre, ...): point --out there.")


def resolve_model(path: str, d: Dist) -> str:
    """A local checkpoint folder for a folder or hub id. A hub id is downloaded once per node, by its local rank 0;
    the other ranks then read that copy from the cache. Errors stop every rank (no one is left waiting)."""
    here = gather_objects(d, os.path.isdir(path))
    if all(here):
        return path
    if any(here):
        raise SystemExit(f"--model {path}: a folder on ranks {[r for r, h in enumerate(here) if h]} but not on "
                         f"ranks {[r for r, h in enumerate(here) if not h]}: give a folder every node sees, or a "
                         f"hub id")
    err = None
    if d.local_rank == 0:
        try:
            CK.resolve_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - reported on every rank
            err = str(e)
    stop_together(d, err)
    return CK.resolve_checkpoint(path, local_files_only=True)


def load_sharded(folder: str, d: Dist, bf16: bool, prepare=None) -> M.Qwen2VL:
    """The checkpoint in `folder` as an FSDP-sharded model, without a full copy of the weights in any process:
    every rank builds the model on the meta device and shards it; rank 0 reads the checkpoint one tensor at a time
    and broadcasts it, and each rank keeps its shard of it. Peak host memory per rank: its shards plus one
    tensor. `prepare(model)` runs before sharding (freezing, activation checkpointing)."""
    model, plan, err = None, None, None
    try:
        model = CK.load(folder, torch.float32, "meta")  # structure and settings: every rank
        if d.main:
            plan = CK.weight_plan(model, folder)  # headers only: a bad checkpoint stops every rank before any read
    except Exception as e:  # noqa: BLE001 - reported on every rank
        err = f"{folder}: {type(e).__name__}: {e}"
    stop_together(d, err)
    order = [(wanted[raw], header[raw]["dtype"]) for _, (header, _), wanted in plan or []
             for raw in sorted(wanted, key=lambda r: header[r]["data_offsets"][0])]  # read_weights' order
    box = [order]
    dist.broadcast_object_list(box, src=0)
    if prepare is not None:
        prepare(model)
    shard_model(model, d, bf16)
    model.to_empty(device=d.device)
    params = dict(model.named_parameters())
    weights = CK.read_weights(plan) if d.main else None
    # Other ranks receive every tensor into one buffer of the largest one's bytes: a fresh allocation per tensor
    # leaves the allocator's heap fragmented, and resident memory grew by up to half the model this way.
    dtypes = [CK.SAFETENSORS_DTYPES[dtype] for _, dtype in box[0]]
    nbytes = [params[name].numel() * dt.itemsize for (name, _), dt in zip(box[0], dtypes)]
    buf = None if d.main else torch.empty(max(nbytes, default=0), dtype=torch.uint8, device=d.device)
    with torch.no_grad():
        for (name, _), dt, size in zip(box[0], dtypes, nbytes):
            p = params[name]
            if d.main:
                got, t = next(weights)
                assert got == name, (got, name)
                t = t.to(d.device)
            else:
                t = buf[:size].view(dt).view(p.shape)
            dist.broadcast(t, src=0)  # in the file's dtype: a bf16 checkpoint travels at half the bytes
            part = t.chunk(d.world)  # FSDP2 shards dim 0 as torch.chunk cuts it (late ranks may get nothing)
            if d.rank < len(part):
                p.to_local().copy_(part[d.rank])
    if model.config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("the tied lm_head lost its tie while sharding")
    return model


def shard_model(model: M.Qwen2VL, d: Dist, bf16: bool | None = None) -> M.Qwen2VL:
    """FSDP2: every vision block and decoder layer is its own unit (gathered just before use, freed after), the
    root holds the rest (embeddings, lm_head, norms, patch embedding, merger). bf16 compute with fp32 master
    weights and gradient reductions on GPU by default; plain fp32 on CPU."""
    bf16 = d.device.type == "cuda" if bf16 is None else bf16
    mesh = init_device_mesh(d.device.type, (d.world,))
    # cast_forward_inputs=False: the model sets every dtype itself, exactly as the plain bf16 model does (FSDP's
    # cast would round the vision tower's fp32 rotary tables to bf16, and rebuild every layer's inputs).
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False) \
        if bf16 else MixedPrecisionPolicy()
    for unit in [*model.visual.blocks, *model.model.layers]:
        fully_shard(unit, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_state_dict(model) -> dict:
    """The whole model's tensors on CPU on rank 0 (an empty dict on other ranks). Every rank must call it."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


