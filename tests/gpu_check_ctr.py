"""
GPU correctness + timing of the CTR reciprocal-attention kernel (attention/ctr_kernel.py).

    python tests/gpu_check_ctr.py                  # correctness, then the timing table
    python tests/gpu_check_ctr.py --quick          # correctness and the main case only

Correctness: bf16 forward and all gradients (q, k, v, a, b) against an fp32 reference (explicit
score matrix), ragged T, D in {32, 64, 128}, b = 0 heads mixed with RA heads, |b| > |a| and a = 0
heads, non-contiguous q/k/v. For scale, the error of the bf16 pure-torch
path is printed next to it.

Timing: triton.testing.do_bench medians of forward and forward+backward, against
F.scaled_dot_product_attention(is_causal=True) with its fastest backend (flash / cudnn /
efficient, each timed). FLOPs: plain causal forward 4*B*H*T*T*D/2, backward 2.5x that; exact RA
heads count 1.5x. The table is printed last.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from attention import ctr_kernel as ck  # noqa: E402
from attention.functional import backend_context  # noqa: E402


def ref_ra32(q, k, v, a, b, scale=None):
    q, k, v = q.float(), k.float(), v.float()
    T, D = q.shape[-2:]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qk = q @ k.transpose(-1, -2)
    s = scale * (a.float().view(1, -1, 1, 1) * qk + b.float().view(1, -1, 1, 1) * qk.transpose(-1, -2))
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1) @ v


def make(B, H, T, D, dtype=torch.bfloat16, a_vals=None, b_vals=None, noncontig=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    if noncontig:  # like the module: views of one (B, T, 3, H, D) projection
        qkv = torch.randn(B, T, 3, H, D, device="cuda", generator=g).to(dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    else:
        q, k, v = (torch.randn(B, H, T, D, device="cuda", generator=g).to(dtype) for _ in range(3))
    a = torch.tensor(a_vals, device="cuda") if a_vals is not None else 1.0 + 0.2 * torch.randn(H, device="cuda", generator=g)
    b = torch.tensor(b_vals, device="cuda") if b_vals is not None else 0.5 * torch.randn(H, device="cuda", generator=g)
    do = torch.randn(B, H, T, D, device="cuda", generator=g).to(dtype)
    return q, k, v, a.float(), b.float(), do


def grads(fn, q, k, v, a, b, do):
    xs = [x.detach().requires_grad_(True) for x in (q, k, v, a, b)]
    out = fn(*xs)
    out.backward(do.to(out.dtype))
    return [out.detach()] + [x.grad for x in xs]


def rel(x, y):
    return ((x.double() - y.double()).norm() / y.double().norm().clamp_min(1e-30)).item()


NAMES = ("out", "dq", "dk", "dv", "da", "db")

# explicit configs for the ragged-T checks (one compile each); the "auto" cases use the autotuner
# with the same key (T, D) as the timing runs, so they check the configs that get timed
FIXED = {
    32: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3)),
    64: (dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_M=16, BLOCK_N=128, num_warps=8, num_stages=3)),
    128: (dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=3), dict(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=3)),
}
CHECK_CASES = [
    dict(B=2, H=4, T=333, D=64, b_vals=[0.5, 0.0, -0.4, 0.0], noncontig=True),
    dict(B=2, H=4, T=256, D=128, a_vals=[1.0, 0.5, 0.0, 1.2], b_vals=[0.3, -1.5, 0.8, 0.0]),
    dict(B=1, H=3, T=200, D=32, b_vals=[0.3, 0.0, 0.6]),
    dict(B=2, H=2, T=1024, D=64, auto=True),
    dict(B=1, H=4, T=1024, D=128, b_vals=[0.3, 0.0, 0.5, 0.0], auto=True),
]


def _compile_job(spec):
    """Worker process: one real launch with a fixed config, to fill Triton's on-disk cache."""
    (B, H, T, D, noncontig, fcfg, bcfg, bwd, need_db) = spec
    q, k, v, a, b, do = make(B, H, T, D, noncontig=noncontig)
    scale = 1.0 / math.sqrt(D)
    q, k, v = (ck._last_contig(x) for x in (q, k, v))
    o, lse = ck._launch_fwd(q, k, v, a, b, scale, fcfg)
    if bcfg is not None:
        ck._launch_bwd(do, q, k, v, o, lse, a, b, scale, need_db, bcfg)
    torch.cuda.synchronize()
    return spec


def precompile(bwd_list, quick, workers=12):
    """Compile every kernel variant the run needs in parallel processes (Triton compiles are
    single-threaded and the autotuner compiles its configs one by one)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    def cfgs(by_d, D):
        return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for (m, n, w, st) in by_d[128 if D >= 128 else 64]]

    jobs = []
    for c in CHECK_CASES:
        B, H, T, D, nc = c["B"], c["H"], c["T"], c["D"], c.get("noncontig", False)
        if c.get("auto"):
            for fc in cfgs(ck._FWD_BY_D, D):
                jobs.append((B, H, T, D, nc, fc, None, None, True))
            for bc in cfgs(ck._BWD_BY_D, D):
                for bwd in bwd_list:
                    jobs.append((B, H, T, D, nc, FIXED[D][0], bc, bwd, True))
                    if D == 64 and not quick:
                        jobs.append((B, H, T, D, nc, FIXED[D][0], bc, bwd, False))
        else:
            for bwd in bwd_list:
                jobs.append((B, H, T, D, nc, FIXED[D][0], FIXED[D][1], bwd, True))
    jobs.append((2, 4, 300, 64, False, FIXED[64][0], FIXED[64][1], "fused", False))
    t0 = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = [ex.submit(_compile_job, j) for j in jobs]
        for f in futs:
            try:
                f.result()
            except Exception as e:
                print(f"[precompile] job failed: {type(e).__name__}: {str(e)[:300]}")
    print(f"[precompile] {len(jobs)} launches in {time.time() - t0:.0f}s")


def check(bwd_list, tol=2e-2):
    ok = True
    for i, c in enumerate(CHECK_CASES):
        q, k, v, a, b, do = make(**{k_: v_ for k_, v_ in c.items() if k_ != "auto"}, seed=i)
        want = grads(ref_ra32, q.float(), k.float(), v.float(), a, b, do.float())
        base = grads(lambda *x: ck.reciprocal_attention_torch(*x), q, k, v, a, b, do)
        base_err = " ".join(f"{n}={rel(g, w):.1e}" for n, g, w in zip(NAMES, base, want))
        print(f"[check] case {i} {c}\n        bf16 torch path: {base_err}")
        for bwd in bwd_list:
            kw = dict() if c.get("auto") else dict(fwd_config=FIXED[c["D"]][0], bwd_config=FIXED[c["D"]][1])
            got = grads(lambda *x: ck.ctr_attention(*x, **kw), q, k, v, a, b, do)
            if c.get("auto"):  # the first call tuned; check the remembered-config path too
                got = grads(lambda *x: ck.ctr_attention(*x, **kw), q, k, v, a, b, do)
            errs = {n: rel(g, w) for n, g, w in zip(NAMES, got, want)}
            # da/db are sums of many cancelling bf16 terms: the bf16 torch path is off by ~1e-2 too
            bad = [n for n, e in errs.items() if not e < (5e-2 if n in ("da", "db") else tol)]
            ok &= not bad
            print(f"        ctr bwd={bwd:6s}:  " + " ".join(f"{n}={e:.1e}" for n, e in errs.items())
                  + (f"   FAIL {bad}" if bad else "   ok"))
    # db_at_zero=False: db = 0 on b == 0 heads
    q, k, v, a, b, do = make(2, 4, 300, 64, b_vals=[0.5, 0.0, -0.4, 0.0], seed=9)
    got = grads(lambda *x: ck.ctr_attention(*x, db_at_zero=False, fwd_config=FIXED[64][0], bwd_config=FIXED[64][1]),
                q, k, v, a, b, do)
    want = grads(ref_ra32, q.float(), k.float(), v.float(), a, b, do.float())
    zero_ok = bool((got[5][[1, 3]] == 0).all()) and rel(got[5][[0, 2]], want[5][[0, 2]]) < 5e-2
    ok &= zero_ok and all(rel(g, w) < tol for g, w in zip(got[:4], want[:4]))
    print(f"[check] db_at_zero=False: {'ok' if zero_ok else 'FAIL'}")
    return ok


def sdpa_best(q, k, v, do):
    """(fwd ms, fwd+bwd ms, backend) of the fastest SDPA backend for each."""
    best_f, best_fb, best_gf, best_gfb = (1e9, None), (1e9, None), (1e9, None), (1e9, None)
    for be in ("flash", "cudnn", "efficient"):
        try:
            with backend_context(be):
                f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731

                def fb():
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(do)

                for _ in range(3):  # cuDNN builds its plans on the first calls
                    fb()
                torch.cuda.synchronize()
                with torch.no_grad():
                    tf = do_bench(f, warmup=25, rep=100, return_mode="median")
                tfb = do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v], return_mode="median")
                gf, gfb = graph_times(f, fb, [q, k, v]) if be != "efficient" else (float("nan"),) * 2
        except Exception as e:  # backend unavailable for this shape
            print(f"  sdpa {be}: unavailable ({type(e).__name__}: {str(e)[:80]})")
            continue
        print(f"  sdpa {be:9s}: fwd {tf:.3f} ms  fwd+bwd {tfb:.3f} ms   graph: fwd {gf:.3f} ms  fwd+bwd {gfb:.3f} ms")
        best_f = min(best_f, (tf, be))
        best_fb = min(best_fb, (tfb, be))
        if gf == gf:
            best_gf = min(best_gf, (gf, be))
            best_gfb = min(best_gfb, (gfb, be))
    return best_f[0], best_fb[0], f"{best_f[1]}/{best_fb[1]}", best_gf[0], best_gfb[0], f"{best_gf[1]}/{best_gfb[1]}"


def graph_times(f, fb, grads_of):
    """GPU-only medians (ms) of f under no_grad and of fb, each replayed as a CUDA graph: no host
    overhead (on this VM the host side of one attention fwd+bwd costs more than its kernels at T=1024)."""
    try:
        with torch.no_grad():
            gf = do_bench_cudagraph(f, rep=50, return_mode="median")
        gfb = do_bench_cudagraph(fb, rep=50, grad_to_none=grads_of, return_mode="median")
        return gf, gfb
    except Exception as e:
        print(f"  cuda graph timing failed: {type(e).__name__}: {str(e)[:200]}")
        return float("nan"), float("nan")


def ctr_time(q, k, v, a, b, do, bwd, db_at_zero=True):
    f = lambda: ck.ctr_attention(q, k, v, a, b, db_at_zero=db_at_zero)  # noqa: E731

    def fb():
        ck.ctr_attention(q, k, v, a, b, db_at_zero=db_at_zero).backward(do)

    t0 = time.time()
    fb()  # compile + autotune
    torch.cuda.synchronize()
    tune_s = time.time() - t0
    with torch.no_grad():
        tf = do_bench(f, warmup=25, rep=100, return_mode="median")
    tfb = do_bench(fb, warmup=25, rep=100, grad_to_none=[q, k, v, a, b], return_mode="median")
    return (tf, tfb) + graph_times(f, fb, [q, k, v, a, b]) + (tune_s,)


def cpu_profile(q, k, v, a, b, do):
    """Host time per fwd+bwd call (the GPU is idle when that exceeds the kernels' time)."""
    import cProfile
    import io
    import pstats

    xs = (q, k, v, a, b)

    def run(fn, n):
        for _ in range(n):
            for x in xs:
                x.grad = None
            fn().backward(do)

    for name, fn in (("ctr fused", lambda: ck.ctr_attention(q, k, v, a, b)),
                     ("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))):
        run(fn, 3)
        torch.cuda.synchronize()
        n = 30
        t0 = time.perf_counter()
        run(fn, n)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        print(f"  host {name:9s}: {(t1 - t0) / n * 1e3:.3f} ms/call to enqueue, {(t2 - t0) / n * 1e3:.3f} ms/call with the GPU")
    pr = cProfile.Profile()
    pr.enable()
    run(lambda: ck.ctr_attention(q, k, v, a, b), 20)
    pr.disable()
    torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(10)
    print("\n".join(line[:150] for line in out.getvalue().splitlines()[-16:]))


def kinfo(name):
    kern = ck.LAST_KERNELS.get(name)
    if kern is None:
        return "?"
    try:
        return f"regs={kern.n_regs} spills={kern.n_spills} smem={kern.metadata.shared}"
    except Exception:
        return "?"


def tuner_report(tuner, label):
    timings = getattr(tuner, "configs_timings", None) or {}
    best = getattr(tuner, "best_config", None)
    items = ", ".join(f"{ck._key(c)}:{(t[0] if isinstance(t, (list, tuple)) else t):.3f}" for c, t in timings.items())
    print(f"  {label} best {ck._key(best) if best else None}; timings(ms) {items}")


def bench(bwd_list, quick=False):
    H = 12
    cases = [(8, 1024, 64, 1.0)]
    if not quick:
        cases += [(8, 2048, 64, 1.0), (8, 4096, 64, 1.0), (8, 1024, 128, 1.0), (8, 1024, 64, 0.25)]
    rows = []
    for B, T, D, frac in cases:
        n_ra = int(round(frac * H))
        b_vals = [0.3] * n_ra + [0.0] * (H - n_ra)
        q, k, v, a, b, do = make(B, H, T, D, a_vals=[1.0] * H, b_vals=b_vals, seed=T + D)
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        a.requires_grad_(True)
        b.requires_grad_(True)
        print(f"\n[bench] B={B} H={H} T={T} D={D} RA heads={n_ra}/{H}")
        sf, sfb, sbe, gsf, gsfb, gsbe = sdpa_best(q, k, v, do)
        flop_f = 4.0 * B * H * T * T * D / 2
        mult = 1.0 + 0.5 * n_ra / H
        main = (T, D) == (1024, 64)  # the atomic scheme only where it is in the running
        variants = [(bwd, True) for bwd in bwd_list if main or bwd == "fused"]
        if frac < 1.0:
            variants += [(bwd, False) for bwd in bwd_list if bwd == "fused"]
        for bwd, dbz in variants:
            tf, tfb, gf, gfb, tune_s = ctr_time(q, k, v, a, b, do, bwd, dbz)
            gb = gfb - gf
            label = bwd + ("" if dbz else ",db0")
            print(f"  ctr {label:10s}: fwd {tf:.3f} ms  fwd+bwd {tfb:.3f} ms   graph: fwd {gf:.3f} fwd+bwd {gfb:.3f}  (first call {tune_s:.1f}s)  "
                  f"fwd[{kinfo('fwd')}] bwd[{kinfo('bwd')}]")
            if tune_s > 0.05:  # tuned in this first call: the timings are this case's
                tuner_report(ck._fwd_tuned, "fwd")
                tuner_report(ck._bwd_tuned, "bwd")
            rows.append(dict(B=B, T=T, D=D, ra=f"{n_ra}/{H}", bwd=label, sdpa_f=sf, sdpa_fb=sfb, be=sbe,
                             f=tf, fb=tfb, ratio=tfb / sfb, gs_fb=gsfb, gbe=gsbe, gf=gf, gfb=gfb, ratio_g=gfb / gsfb,
                             ratio_gf=gf / gsf, tf_f=flop_f * mult / gf * 1e-9, tf_b=2.5 * flop_f * mult / gb * 1e-9,
                             sdpa_tf_f=flop_f / gsf * 1e-9, sdpa_tf_b=2.5 * flop_f / (gsfb - gsf) * 1e-9))
        if (T, D, frac) == (1024, 64, 1.0):
            cpu_profile(q, k, v, a, b, do)
        del q, k, v, do
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--no-precompile", action="store_true")
    args = ap.parse_args()
    bwd_list = ["fused"]  # the backward scheme (label in the table): the atomic one was removed
    print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}")
    ok = True
    if not args.no_precompile:
        precompile(bwd_list, args.quick)
    if not args.no_check:
        t0 = time.time()
        ok = check(bwd_list)
        print(f"[check] {'PASS' if ok else 'FAIL'} ({time.time() - t0:.0f}s)")
    rows = bench(bwd_list, quick=args.quick)
    print("\nms medians. do_bench: host launch overhead included (this VM's host is slow: at T=1024 both SDPA and")
    print("ctr are partly host-bound there); graph: CUDA-graph replays = GPU time only. ratio* = ctr / best SDPA fwd+bwd")
    print("(same run); r_fwd = forward-only ratio (graph). TFLOP/s from graph times; RA heads counted 1.5x.")
    hdr = (f"{'T':>5} {'D':>4} {'RA':>5} {'bwd':>9} | {'sdpa fb':>7} {'ctr fb':>7} {'ratio':>5} | {'sdpa fb':>7} {'backend':>11} "
           f"{'ctr f':>6} {'ctr fb':>6} {'ratio':>5} {'r_fwd':>5} | {'TF fwd':>6} {'TF bwd':>6} | {'sdpaTFf':>7} {'sdpaTFb':>7}")
    print(f"{'':>5} {'':>4} {'':>5} {'':>9} | {'-- do_bench (host incl.) --':^21} | {'-- CUDA graph (GPU only) --':^44} |")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r['T']:>5} {r['D']:>4} {r['ra']:>5} {r['bwd']:>9} | {r['sdpa_fb']:7.3f} {r['fb']:7.3f} {r['ratio']:5.2f} | "
              f"{r['gs_fb']:7.3f} {r['gbe']:>11} {r['gf']:6.3f} {r['gfb']:6.3f} {r['ratio_g']:5.2f} {r['ratio_gf']:5.2f} | "
              f"{r['tf_f']:6.0f} {r['tf_b']:6.0f} | {r['sdpa_tf_f']:7.0f} {r['sdpa_tf_b']:7.0f}")
    print(f"correctness: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
