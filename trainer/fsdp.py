"""
--fsdp: FSDP2 (torch.distributed.fsdp.fully_shard) for models past one GPU, and its checkpoints through
torch.distributed.checkpoint (DCP). docs/ddp.md says what is tested.

Each transformer Block is one FSDP group (its parameters all-gathered for its forward and backward, its
gradients reduce-scattered), the root the last one: the embeddings, ln_f and the tied lm_head (wte and
lm_head are one parameter, so they live in the root group together). With --dtype bfloat16 (the CUDA
default) the gathered parameters are bf16 for the compute and the gradients are reduced in fp32; in fp32
(the CPU default, and the tests) there is no cast, so a sharded run computes what an unsharded one does.
Outside a forward each rank holds only its shards (DTensors): what reads whole parameters there (the
attention modules' metrics and gates, a routing refresh) runs inside gathered().
"""

import contextlib
import shutil

import torch
import torch.distributed as dist


def init_single_process(device):
    """--fsdp without torchrun: a process group of one (FSDP2 shards over a process group; one rank holds
    every shard), so that the same code path runs, and a checkpoint written on N ranks resumes on one."""
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def shard(model, dtype, compile_blocks=False, compile_backend="inductor"):
    """fully_shard every Block, then the root; in place (the model's class becomes its FSDP subclass, so
    num_params, flops_per_token and the other methods stay). Before the optimizer is built: it must hold the
    sharded parameters. dtype: the run's resolved --dtype. compile_blocks (--compile): each Block's forward
    torch.compile'd first. FSDP's all-gather and reduce-scatter hooks run around the forward, outside the
    compiled code; the Blocks share one compiled graph (same code, parameters as its inputs); the parameter
    names, and so the DCP checkpoints, are those of an uncompiled run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if dtype == "bfloat16"
          else MixedPrecisionPolicy())
    # the mesh on the model's device: fully_shard's default mesh takes the machine's accelerator, so a CPU
    # (gloo) run on a machine with a GPU would move the shards to the GPU
    mesh = init_device_mesh(next(model.parameters()).device.type, (dist.get_world_size(),))
    if compile_blocks:
        for block in model.transformer.h:
            block.forward = torch.compile(block.forward, backend=compile_backend)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@contextlib.contextmanager
def gathered(model):
    """Whole parameters on every rank for the duration (an all-gather: every rank must enter it), then the
    shards again. For host-side reads of the parameters; not for anything that backpropagates."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in groups:
        m.unshard()
    try:
        yield
    finally:
        for m in groups:
            m.reshard()


def save(run_dir, model, optimizer, meta, master, save_meta):
    """A checkpoint: every rank writes its shards of the model and optimizer state (DCP) into a new folder
    <run>/ckpt_dcp/step-<step>/, then rank 0 writes ckpt.pt (save_meta: atomic, as without --fsdp) with the
    non-tensor state in meta and that folder's name. ckpt.pt's rename is the commit: a crash before it leaves
    the previous ckpt.pt and the folder it names intact; older folders go after it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"step-{meta['step']:08d}"
    folder = run_dir / "ckpt_dcp" / name
    if master and folder.exists():  # left by a run that stopped between these shards and its commit
        shutil.rmtree(folder)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(folder))
    dist.barrier()  # every rank's shards are on disk before ckpt.pt names them
    if master:
        save_meta({**meta, "model": None, "optimizer": None, "dcp": f"ckpt_dcp/{name}"})
        for old in (run_dir / "ckpt_dcp").iterdir():
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)


def load(run_dir, ckpt, model, optimizer):
    """Restore the model and optimizer state of a --fsdp checkpoint (ckpt: its ckpt.pt) into the sharded
    model and its optimizer, on any number of ranks (DCP reshards)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)  # the shapes to read into (optimizer state included)
    state = {"model": model_sd, "optimizer": optim_sd}
    dcp.load(state, checkpoint_id=str(run_dir / ckpt["dcp"]))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
