"""
Train a GPT-2-style model with a named attention implementation.

    python train.py --attn ra_headsel --max-steps 1000
    torchrun --standalone --nproc_per_node=8 train.py --attn sdpa

Every field of TrainConfig (trainer/config.py) and of model.GPTConfig is a flag
(dashes or underscores). Values resolve as: dataclass default < preset
(config/NAME.json) < command line. A run writes runs/<run-name>/: config.json,
log.jsonl (one JSON object per logged step) and ckpt.pt (atomic, resumable with
--resume). A folder that holds a run is not written into without --resume or
--overwrite, and a lock (train.lock) keeps two processes out of the same folder.
Under torchrun, N processes x --grad-accum A train on the batches that one process
with --grad-accum N*A reads, and a checkpoint resumes on either (docs/ddp.md).
"""

import contextlib
import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch

import attention
from model import GPT
from trainer import fsdp
from trainer.common import (exit_process, gather_objects, gpt_params_floor, init_device, lr_at, mean_over_ranks_,
                            memory_shortfall, peak_flops, replicas_agree, rng_state, set_rng_state,
                            stop_on_signals)
from trainer.config import TrainConfig, parse_args, resolve_config  # noqa: F401  (train.X callers)
from trainer.runs import (RunError, RunLog, cut_log, ensure_data, global_loader_state, open_run, open_splits,
                          save_checkpoint, write_atomic)
from trainer.step import TrainStep, evaluate, launcher, load_batches


def main(argv=None):
    """Train; returns the exit status. Raises RunError (a message, no traceback needed) when the run cannot
    start or go on. The run folder's lock is released on return and on any exception, so a caller may call
    main again in the same process (the quality ladder does)."""
    tc, mc, notes, given = parse_args(argv, description=__doc__)
    with contextlib.ExitStack() as cleanup:
        return train(tc, mc, notes, given, cleanup)


def train(tc, mc, notes, given, cleanup):
    # ---- device; under torchrun also the process group
    ddp, rank, world, device = init_device(tc.device)
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    for n in notes:
        log(n)

    # ---- run folder (locked); with --resume the checkpoint and its config
    tc, mc, run_dir, ckpt = open_run(tc, mc, given, master, log, cleanup, world)
    ckpt_path = run_dir / "ckpt.pt"

    # ---- data: prepared on first use; both splits checked now, not at the first eval
    data_dir = ensure_data(tc, log, master, ddp)
    from data.loader import load_meta

    mc.vocab_size = load_meta(data_dir)["vocab_size"]
    if device.type == "cuda":  # a model whose training state cannot fit: an error now, not an OOM mid-build
        check_memory(mc, tc, device, world, ddp)
    # pinned host batches make the copy truly asynchronous; a pageable copy would sync the host every step
    loader, val_loader = open_splits(data_dir, tc, mc, rank, world, pin_memory=device.type == "cuda")
    if master:
        write_atomic(run_dir / "config.json", json.dumps({**asdict(tc), **asdict(mc), "run_name": run_dir.name,
                                                          "world_size": world, "data_dir": str(data_dir)}, indent=2))
        if ckpt is not None and ckpt["step"] < tc.max_steps:
            moved = cut_log(run_dir, ckpt["step"], tc)
            if moved:
                log(f"log: moved {moved} lines from after the checkpoint (step {ckpt['step']}) to "
                    f"{run_dir / 'log.discarded.jsonl'}; the resumed run writes those steps again")

    # ---- precision
    dtype = tc.dtype if tc.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    autocast = (torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else nullcontext())
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scaler = torch.amp.GradScaler(enabled=(dtype == "float16"))

    # ---- model, optimizer and the training step; the same seed on every rank gives the same init
    torch.manual_seed(tc.seed)
    random.seed(tc.seed)
    np.random.seed(tc.seed)
    model = GPT(mc).to(device)
    if tc.fsdp:  # before the optimizer, which then holds each rank's shards (tc.fsdp: a resume's saved value too)
        if not ddp:
            fsdp.init_single_process(device)
        fsdp.shard(model, dtype, compile_blocks=tc.compile)  # --compile: each Block, before sharding
    optimizer = model.configure_optimizer(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type,
                                          capturable=tc.cuda_graph)
    step = 0
    train_time = 0.0  # seconds spent in training steps (not eval, not checkpoints), over all resumes
    if ckpt is not None:
        if tc.fsdp:
            if "dcp" not in ckpt:
                raise RunError(f"--resume --fsdp: {ckpt_path} was written without --fsdp (whole state dicts, no "
                               "DCP shards); resume it without --fsdp")
            fsdp.load(run_dir, ckpt, model, optimizer)
        else:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        # one global loader state (docs/ddp.md): every rank finds its own micro-batches in it
        state, note = global_loader_state(ckpt)
        if note:
            log(note)
        loader.load_state_dict(state)
        # each rank's own RNG where the checkpoint has it (an exact resume on as many processes, dropout
        # included), else rank 0's: the training step draws nothing at --dropout 0
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
        train_time = ckpt.get("train_time_s", 0.0)
    if tc.cuda_graph:  # a recorded optimizer step reads its lr from a tensor, refilled before every replay
        for group in optimizer.param_groups:
            group["capturable"] = True  # also when the checkpoint was written without --cuda-graph
            group["lr"] = torch.tensor(tc.lr, device=device)
    raw_model = model
    aux_loss = raw_model.aux_loss
    # --compile: the model compiled, then DDP around it; --ddp-overlap: DDP first, then compiled, so that
    # dynamo cuts the graph at DDP's buckets and their all-reduces overlap the backward (--fsdp compiled each
    # Block above)
    compile_after_ddp = ddp and tc.ddp_overlap
    if tc.compile and not tc.fsdp:
        # the attention regularizers too: eagerly they are a few tiny kernels per layer, forward and
        # backward, each a launch the GPU waits for; compiled, one fused kernel each way
        aux_loss = torch.compile(aux_loss)
        if not compile_after_ddp:
            model = torch.compile(model)
    # --cuda-graph: one stream warms up and records the step, and DDP is built on it (cuda_graph.py says why)
    graph_stream = torch.cuda.Stream(device) if tc.cuda_graph else None
    if ddp and not tc.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        with torch.cuda.stream(graph_stream) if graph_stream else nullcontext():
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        bucket_cap_mb=tc.ddp_bucket_mb, gradient_as_bucket_view=tc.ddp_bucket_view)
        if tc.compile and compile_after_ddp:
            model = torch.compile(model)
    # one optimizer step's micro-batches, in fixed device buffers (a CUDA graph reads fixed tensors; one
    # tensor per micro-step, as views at different offsets could recompile the compiled model)
    xbs = [torch.empty((tc.batch_size, mc.block_size), dtype=torch.long, device=device) for _ in range(tc.grad_accum)]
    ybs = [torch.empty_like(x) for x in xbs]
    train_step = TrainStep(model, raw_model, optimizer, scaler, autocast, aux_loss, xbs, ybs, tc.grad_clip,
                           ddp and not tc.fsdp)
    # the log interval under way: train_step's loss sums, its time and steps; a checkpoint keeps them, so
    # the line after a resume averages the same steps as an uninterrupted run's
    interval_time, interval_steps = 0.0, 0
    if ckpt is not None and "interval" in ckpt:
        train_step.loss_sum.copy_(ckpt["interval"]["loss"])
        train_step.aux_sum.copy_(ckpt["interval"]["aux"])
        interval_time, interval_steps = ckpt["interval"]["time_s"], ckpt["interval"]["steps"]
    # --cuda-graph: 3 normal steps (compile, autotune, allocate; under DDP 11, its rule), then train_step
    # recorded and replayed, the all-reduce in it
    run_step = launcher(train_step, optimizer, graphed=tc.cuda_graph, stream=graph_stream, warmup=11 if ddp else 3)

    tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * world
    flops_per_step = raw_model.flops_per_token(mc.block_size) * tokens_per_step
    peak = peak_flops(device)
    log(f"model: {raw_model.num_params() / 1e6:.2f}M params, attn={mc.attn}, device={device}, dtype={dtype}, "
        f"world={world}, tokens/step={tokens_per_step}, compile={tc.compile}, cuda_graph={tc.cuda_graph}"
        + (", fsdp=True" if tc.fsdp else ""))
    run_log = RunLog(tc, mc, run_dir, master, cleanup)
    stop = stop_on_signals(cleanup)  # SIGINT/SIGTERM: finish the step, checkpoint, exit cleanly

    # ---- the loop
    model.train()
    loader_state = load_batches(loader, xbs, ybs)
    last_good_ckpt_step = ckpt["step"] if ckpt else None
    status = "done"
    head_selective = attention.get_class(mc.attn).head_selective
    heads_off_said = False  # said once per run, in its stdout (the ladder's report reads ra_frac from the log)
    while step < tc.max_steps:
        t0 = time.perf_counter()
        lr = lr_at(step, tc)
        for group in optimizer.param_groups:
            if tc.cuda_graph:
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        # a routing refresh reads whole gates: under --fsdp, gathered for it (every rank, the same steps)
        refresh = tc.fsdp and mc.ra_route_every > 0 and step % mc.ra_route_every == 0
        with fsdp.gathered(raw_model) if refresh else nullcontext():
            raw_model.set_step(step)
        run_step()
        loader_state = load_batches(loader, xbs, ybs)
        step += 1
        interval_steps += 1

        is_last = step == tc.max_steps
        on_grid = step % tc.log_every == 0
        if on_grid or is_last:
            # the mean over ranks (one all-reduce per log interval): the loss of the global batch
            mean_over_ranks_([train_step.loss_sum, train_step.aux_sum], world)
            loss_val = (train_step.loss_sum / interval_steps).item()  # the one host sync per log interval
            aux_val = (train_step.aux_sum / interval_steps).item()
            interval_time += time.perf_counter() - t0
            ms = 1000 * interval_time / interval_steps
            rec = {"step": step, "loss": loss_val, "aux_loss": aux_val, "lr": lr,
                   "grad_norm": float(train_step.grad_norm), "ms_per_step": ms,
                   "tokens_per_s": tokens_per_step / (ms / 1000), "train_time_s": train_time + interval_time}
            if peak:
                rec["mfu"] = flops_per_step / (ms / 1000) / (peak * world)
            if device.type == "cuda":
                rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            with fsdp.gathered(raw_model) if tc.fsdp else nullcontext():  # whole gates, not this rank's shards
                rec.update(raw_model.metrics())
                gates = raw_model.gate_values()  # per head and layer: where reciprocity survives (ladder plots)
            if gates:
                rec["gates"] = gates
            run_log.write(rec)
            if head_selective and rec.get("attn/mean/ra_frac") == 0.0 and not heads_off_said:
                heads_off_said = True
                log(f"note: every RA head has switched off by step {step} (ra_frac 0): from here on this run is "
                    "plain attention; a smaller --ra-l1 or --ra-threshold keeps them on")
            log(f"step {step:6d} | loss {loss_val:.4f} | aux {aux_val:.4f} | lr {lr:.2e} | {ms:7.1f} ms/step | "
                f"{rec['tokens_per_s']:9.0f} tok/s" + (f" | mfu {100 * rec['mfu']:.1f}%" if peak else ""))
            if on_grid:  # an off-grid last line leaves the interval open: a resume with more steps completes it
                train_time += interval_time
                train_step.loss_sum.zero_()
                train_step.aux_sum.zero_()
                interval_time, interval_steps = 0.0, 0
            if not math.isfinite(loss_val):
                status = "non-finite loss"
                log(f"stopping: the loss is {loss_val} at step {step}. The last good checkpoint "
                    f"({'step ' + str(last_good_ckpt_step) if last_good_ckpt_step else 'none yet'}) is kept at "
                    f"{ckpt_path}; try a lower --lr, --grad-clip 1.0 or --dtype bfloat16")
                break
        else:
            interval_time += time.perf_counter() - t0

        out_of_time = tc.max_time_min > 0 and train_time + interval_time >= 60 * tc.max_time_min
        if (tc.eval_every and step % tc.eval_every == 0) or is_last or out_of_time:
            val_loss = evaluate(model, val_loader, tc.eval_batches, device, autocast, ddp, tc.fsdp)
            run_log.write({"step": step, "val_loss": val_loss, "train_time_s": train_time + interval_time})
            log(f"step {step:6d} | val loss {val_loss:.4f}")
        if (tc.ckpt_every and step % tc.ckpt_every == 0) or is_last or stop["signal"] or out_of_time:
            # the global loader position (the same on every rank), every rank's RNG, and the open interval's
            # loss sums averaged over the ranks, so that a resume on any world size continues exactly
            rngs = gather_objects(rng_state(), world)
            mean_over_ranks_([train_step.loss_sum, train_step.aux_sum], world)
            interval = {"loss": train_step.loss_sum.cpu(), "aux": train_step.aux_sum.cpu(),
                        "time_s": interval_time, "steps": interval_steps}
            meta = {"scaler": scaler.state_dict(), "loader": loader_state, "rng": rngs, "step": step,
                    "model_config": asdict(mc), "train_config": asdict(tc), "train_time_s": train_time,
                    "interval": interval, "world_size": world}
            if tc.fsdp:  # every rank writes its shards; ckpt.pt (rank 0) holds meta and names them
                fsdp.save(run_dir, raw_model, optimizer, meta, master, lambda obj: save_checkpoint(ckpt_path, obj))
            elif master:
                save_checkpoint(ckpt_path, {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                                            **meta})
            last_good_ckpt_step = step
        if stop["signal"]:
            status = f"stopped by signal {stop['signal']}"
            log(f"{status}: checkpoint at step {step} in {ckpt_path}; continue with --resume")
            break
        if out_of_time:
            status = "time budget reached"
            log(f"{status} ({tc.max_time_min} min): stopping at step {step}")
            break

    # ---- the end
    if ddp and not tc.fsdp:  # under --fsdp each rank holds other shards: there are no replicas to compare
        log(f"ddp: parameters {'identical' if replicas_agree(raw_model, world) else 'DIFFER'} across {world} ranks")
    if master:
        summary = {"status": status, "step": step, "train_time_s": train_time + interval_time,
                   "run_dir": str(run_dir)}
        write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
        run_log.finish()
    run_step.release()  # a graph that holds captured collectives would hang destroy_process_group
    if ddp or tc.fsdp:
        import torch.distributed as dist

        # all ranks reach the teardown together: a gloo rank that tears down while its peer is still
        # writing the summary can abort at exit ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return 0 if status != "non-finite loss" else 1


def check_memory(mc, tc, device, world, ddp):
    """RunError if the model's training state (trainer.common.state_bytes_per_gpu) exceeds the free memory of
    the fullest GPU of the run (every rank decides alike)."""
    n_params = gpt_params_floor(mc)
    free = torch.tensor([float(torch.cuda.mem_get_info(device)[0])], device=device)
    if ddp:
        import torch.distributed as dist

        dist.all_reduce(free, op=dist.ReduceOp.MIN)
    why = memory_shortfall(n_params, free.item(), world, tc, tc.preset)
    if why:
        raise RunError(why)


if __name__ == "__main__":
    try:
        status = main()
    except RunError as e:
        sys.exit(f"error: {e}")
    exit_process(status)  # under torchrun: past the interpreter's teardown (trainer/common.py says why)
