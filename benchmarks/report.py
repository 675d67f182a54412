"""bench.py's output: the markdown tables (one per section, --profile's, the summary) and the JSON's meta."""

import datetime

import torch

from trainer.gitinfo import git_describe

from .profile import KERNEL_CATEGORIES
from .variants import FUNCTIONS


def fmt(v, spec):
    return "" if v is None else format(v, spec)


def fmt_flops(v):
    return "" if v is None else (f"{v:.1f}" if v >= 1 else f"{v:.3g}")


def markdown(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(str(c) for c in line) + " |" for line in lines])


def status(r):
    return r["status"] + (f" -- printed: {r['note']}" if r.get("note") else "")


def section_table(rows):
    if rows[0]["section"] == "step":
        header = ["variant", "mode", "ms/step", "tokens/s", "TFLOP/s", "MFU", "x sdpa", "peak MiB", "1st step s", "status"]
        # a setting (--ra-heads) goes with the variant's name: "ra_exact_headsel ra_heads=3/12"
        lines = [[" ".join(filter(None, (r["variant"], r["setting"]))), r["passes"], fmt(r["ms"], ".2f"),
                  fmt(r.get("tokens_per_s"), ",.0f"),
                  fmt_flops(r["tflops"]), fmt(r.get("mfu"), ".1%"), fmt(r["ratio"], ".3f"),
                  fmt(r["mem_mib"], ",.0f"), fmt(r.get("first_step_s"), ".1f"), status(r)] for r in rows]
        if any("ratio_paired" in r for r in rows):  # --interleave
            header.insert(7, "x sdpa paired [range]")
            for line, r in zip(lines, rows):
                rng = r.get("ratio_range")
                line.insert(7, f"{r['ratio_paired']:.3f} [{rng[0]:.3f}, {rng[1]:.3f}]" if "ratio_paired" in r else "")
    else:
        header = ["kind", "variant", "setting", "pass", "ms", "TFLOP/s", "x sdpa", "mem MiB", "timing", "status"]
        lines = [[r["kind"], r["variant"], r["setting"], r["passes"], fmt(r["ms"], ".3f"), fmt_flops(r["tflops"]),
                  fmt(r["ratio"], ".3f"), fmt(r["mem_mib"], ",.0f"), r.get("timing", ""), status(r)] for r in rows]
    return markdown(header, lines)


def profile_table(rows):
    """Where the step time goes (--profile): kernel ms per category, and each variant's difference
    to sdpa in the same mode, so "1.02x" becomes "+0.4 ms of compiled kernels, +0.3 ms idle"."""
    rows = [r for r in rows if r.get("profile")]
    if not rows:
        return ""
    cats = [c for c, _ in KERNEL_CATEGORIES] + ["other"]
    base = {r["passes"]: r for r in rows if r["variant"] == "sdpa"}

    def cells(r):
        p = r["profile"]
        return [r["ms"], p["total_ms"], r["ms"] - p["total_ms"]] + [p["categories"].get(c, 0.0) for c in cats]

    lines, tops = [], []
    for r in rows:
        own = cells(r)
        lines.append([r["variant"], r["passes"]] + [f"{v:.2f}" for v in own])
        b = base.get(r["passes"])
        if b is not None and b is not r:
            lines.append(["", "- sdpa"] + [f"{v - w:+.2f}" for v, w in zip(own, cells(b))])
        tops.append(f"{r['variant']} ({r['passes']}): " + "; ".join(
            f"{ms:.2f} ms x{n:g} {name[:60]}" for ms, n, name in r["profile"]["top"][:6]))
    table = markdown(["variant", "mode", "step ms", "kernels ms", "GPU idle ms"] + [f"{c} ms" for c in cats], lines)
    out = table + "\n\ntop kernels per step:\n" + "\n".join("  " + t for t in tops)
    clocked = [r for r in rows if r.get("clocks")]
    if clocked:  # --clocks: a step timed at a lower clock than it was profiled at shows up as "GPU idle"
        out += "\n\nSM clock and power (nvidia-smi, median of the busy samples), timed rounds / profiled steps:\n" + \
            "\n".join(f"  {r['variant']} ({r['passes']}): " + " / ".join(
                clock_cell(r["clocks"].get(k)) for k in ("timed", "profiled")) for r in clocked)
    return out


def clock_cell(c):
    return "no samples" if not c else f"{c['sm_mhz']:.0f} MHz, {c['power_w']:.0f} W ({c['n']} samples)"


def summary(bench):
    """One line per variant (ratios to sdpa), then one line per sweep setting."""
    rows, out = bench.rows, []
    get = lambda **kw: next((r for r in rows if all(r[k] == v for k, v in kw.items())), None)
    cell = lambda r: "" if r is None else (f"{r['ratio']:.2f}x" if r["ratio"] is not None else r["status"].split(":")[0])
    top = [r for r in rows if r["section"] in ("attn", "step")]
    fn_of = {owner: label for label, owner, _, _ in FUNCTIONS}  # a variant's line shows its function's ratio
    names = list(dict.fromkeys(r["variant"] for r in top if r["kind"] != "function"))
    names += [r["variant"] for r in top if r["kind"] == "function" and r["passes"] == "fwd"
              and not any(fn_of.get(n) == r["variant"] for n in names)]
    if names:
        lines = []
        for n in names:
            m = dict(section="attn", variant=n, kind="module")
            f = get(section="attn", variant=fn_of.get(n, n), kind="function", passes="fwd+bwd")
            st, sc = (next((r for r in rows if r["section"] == "step" and r["variant"] == n
                            and r["passes"].split("+")[0] == mode), None) for mode in ("eager", "compile"))
            bad = sorted((status(r) for r in top if r["variant"] in (n, fn_of.get(n)) and status(r) != "ok"),
                         key=lambda s: s.startswith("ok"))  # errors before notices
            lines.append([n, cell(get(**m, passes="fwd")), cell(get(**m, passes="fwd+bwd")), cell(f),
                          fmt(st and st["ms"], ".1f"), cell(st), fmt(st and st.get("mfu"), ".1%"),
                          fmt(sc and sc["ms"], ".1f"), cell(sc), (bad[0][:80] if bad else "ok")])
        out.append(markdown(["variant", "attn fwd", "attn f+b", "its fn f+b", "step ms", "step", "MFU",
                             "compile ms", "compile", "status"], lines))
    for sec in dict.fromkeys(r["section"] for r in rows if r["section"].startswith("sweep")):
        sweep = [r for r in rows if r["section"] == sec and r["passes"] == "fwd+bwd"]
        settings = list(dict.fromkeys(r["setting"] for r in sweep if r["setting"]))
        lines = []
        for kind, n in dict.fromkeys((r["kind"], r["variant"]) for r in sweep):
            cells = [cell(get(section=sec, kind=kind, variant=n, setting=st, passes="fwd+bwd")) for st in settings]
            base = get(section=sec, kind=kind, variant=n, setting="", passes="fwd+bwd")
            if base:  # a baseline measured once for the whole sweep
                cells = [f"{base['ms']:.3f} ms" if base["ms"] else cell(base)] + [""] * (len(settings) - 1)
            lines.append([f"{kind} {n}"] + cells)
        out.append(markdown([f"{sec}, fwd+bwd"] + settings, lines))
    return "\n\n".join(out)


def meta(args, device):
    try:
        import triton
        triton_version = triton.__version__
    except Exception:
        triton_version = None
    cuda = device.type == "cuda"
    return dict(device=str(device), device_name=torch.cuda.get_device_name(device) if cuda else "cpu",
                smoke=not cuda, torch=torch.__version__, triton=triton_version, cuda=torch.version.cuda,
                cudnn=torch.backends.cudnn.version() if cuda else None,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git_commit=git_describe(short=False), argv=args.argv, dtype=args.dtype, peak_flops=args.peak_flops,
                shapes=dict(attn=dict(B=args.B, H=args.H, T=args.T, D=args.D),
                            step=dict(batch=args.batch, T=args.step_T, n_layer=args.n_layer, n_head=args.n_head,
                                      n_embd=args.n_embd, vocab_size=args.vocab_size)),
                timing=dict(warmup=args.warmup, reps=args.reps, step_warmup=args.step_warmup,
                            step_reps=args.step_reps, n_inputs=args.n_inputs,
                            attn="cuda graph replays" if (cuda and args.graphs) else "eager calls",
                            step="one CUDA graph per step" if (cuda and args.cuda_graph) else "launched from Python"),
                cfg=args.cfg)
