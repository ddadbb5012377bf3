"""`make gpu-check`: everything that needs a CUDA device, in one call, as one table.

Sections, each in its own process with its own time limit (a hang or a crash in one is a FAIL
row with the error, and the next section still runs):
  build      make build-ext with the CUDA kernels (TORCH_CUDA_ARCH_LIST) and check cedm._C has them
  tests      pytest -m cuda: every CUDA test (none may be skipped)
  opcheck    torch.library.opcheck of every cedm op on CUDA, contiguous and channels_last inputs
  ops        fused ops against eager PyTorch (CUDA events, medians), the Heun step's bandwidth
             against a device-to-device copy's
  train-*    one C-EDM training step of the CIFAR preset: the pure PyTorch reference path at EDM's
             settings (fp32, CEDM_OPS=reference, Adam, per-parameter EMA and nan_to_num as EDM's
             training loop) against ours (fused ops, channels_last, fused Adam, foreach EMA) in
             fp32, bf16 and fp16 autocast
  sample-*   the 18-step Heun sampler (35 network calls), reference path vs ours, and the seconds
             per 50k CIFAR samples it implies
The table goes to stdout and, when $OUT is set, to $OUT/gpu_check.md (with the build and test
logs beside it). Without a CUDA device it says so and exits with status 2.
`--device cpu --smoke` runs the timing sections at toy sizes on the CPU (tests/test_gpu_check.py).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 540          # the whole check, well under 10 minutes
EDM_SETTINGS = "fp32, contiguous, CEDM_OPS=reference, Adam + EMA + nan_to_num as NVlabs/edm"

# name -> (time limit in seconds, what it does)
SECTIONS = {
    "build": (300, "build cedm._C with the CUDA kernels"),
    "tests": (150, "pytest -m cuda"),
    "opcheck": (60, "torch.library.opcheck on CUDA"),
    "ops": (60, "fused ops vs eager, Heun step vs copy bandwidth"),
    "knn": (60, "exact cosine kNN throughput, extrapolated to 1M and 10M images"),
    "train-ref": (60, "CIFAR train step, reference path at EDM's settings"),
    "train-fp32": (60, "CIFAR train step, ours fp32"),
    "train-bf16": (60, "CIFAR train step, ours bf16 + channels_last"),
    "train-fp16": (60, "CIFAR train step, ours fp16 + channels_last"),
    "sample-ref": (60, "Heun sampler, reference path fp32"),
    "sample-bf16": (60, "Heun sampler, ours bf16 + channels_last"),
}
TRAIN_GOAL = 1.3              # img/s vs the reference path at EDM's settings (issue 13)
HEUN_BW_GOAL = 0.8            # Heun step bandwidth / device-to-device copy bandwidth


def _row(check, result, goal="", status="INFO", note=""):
    return {"check": check, "result": result, "goal": goal, "status": status, "note": note}


# ----------------------------------------------------------------------------------------------
# Timing helpers

def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _times(fns: dict, dev, warmup: int, reps: int) -> dict:
    """Seconds per call of each function, the functions taking turns in every repeat; CUDA
    events on a GPU. Returns name -> (median, min, max)."""
    import torch

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    _sync(dev)
    out = {n: [] for n in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            if dev.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                out[name].append(a.elapsed_time(b) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                out[name].append(time.perf_counter() - t0)
    return {n: (statistics.median(t), min(t), max(t)) for n, t in out.items()}


def _ms(t):
    med, lo, hi = t
    return f"{med * 1e3:.3g} ms [{lo * 1e3:.3g}-{hi * 1e3:.3g}]"


# ----------------------------------------------------------------------------------------------
# Sections (each runs in a child process: `python -m benchmarks.gpu_check --section NAME`)

def section_build(args) -> list[dict]:
    import torch

    env = dict(os.environ)
    env.pop("CEDM_NO_CUDA", None)
    env["MAX_JOBS"] = str(max(2, min(16, os.cpu_count() or 2)))
    if torch.cuda.is_available():  # this device's architecture only: half the nvcc time
        major, minor = torch.cuda.get_device_capability(0)
        env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    log = Path(args.logdir) / "build.log"
    with open(log, "w") as f:
        r = subprocess.run(["make", "build-ext"], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        tail = log.read_text()[-1500:]
        raise RuntimeError(f"make build-ext failed (exit {r.returncode}); log tail: {tail}")
    probe = subprocess.run([sys.executable, "-c", "from cedm import _C; print(_C.has_cuda(), _C.cpu_isa())"],
                           cwd=ROOT, capture_output=True, text=True)
    has_cuda, isa = (probe.stdout.split() + ["?", "?"])[:2]
    ok = probe.returncode == 0 and has_cuda == "True"
    return [_row("build: cedm._C with CUDA kernels", f"has_cuda={has_cuda}, CPU kernels {isa}",
                 "has_cuda=True", "PASS" if ok else "FAIL",
                 f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', '8.0;9.0')}; log build.log"
                 + ("" if probe.returncode == 0 else f"; import failed: {probe.stderr[-500:]}"))]


def section_tests(args) -> list[dict]:
    import xml.etree.ElementTree as ET

    xml = Path(args.logdir) / "pytest-cuda.xml"
    log = Path(args.logdir) / "pytest-cuda.log"
    env = dict(os.environ)
    env.pop("CEDM_OPS", None)
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", "tests"], cwd=ROOT, env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.exists():
        for suite in ET.parse(xml).getroot().iter("testsuite"):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    bad = counts["failures"] + counts["errors"]
    ok = r.returncode == 0 and bad == 0 and counts["skipped"] == 0 and passed > 0
    failed = []
    if bad and xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(case.get("name"))
    return [_row("tests: pytest -m cuda", f"{passed} passed, {bad} failed, {counts['skipped']} skipped",
                 "all pass, none skipped", "PASS" if ok else "FAIL",
                 (f"failed: {', '.join(failed[:8])}; " if failed else "") + f"pytest exit {r.returncode}; "
                 "log pytest-cuda.log")]


def _op_cases(dev, dtype):
    """(op name, layout, args) for every op: contiguous, and channels_last for the 4-d ones."""
    import torch

    g = torch.Generator().manual_seed(0)
    rn = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)  # noqa: E731
    z = rn(2, 3, 5, 7)
    qt = torch.softmax(rn(2, 3, 5, 7).float() / 0.3, -1).to(dtype)
    prior = torch.softmax(rn(3, 7).float(), -1).to(dtype)
    _, w, lse = torch.ops.cedm.temi_loss(z, qt, prior, 0.6, 0.1)
    sigma = (rn(4).float() * 1.2 - 1.2).exp().to(dtype)
    rg = lambda t: t.detach().clone().requires_grad_()  # noqa: E731
    cases = [("temi_loss", "contiguous", (rg(z), qt, prior, 0.6, 0.1)),
             ("temi_loss_backward", "contiguous", (torch.rand(3, device=dev), z, qt, prior, w, lse, 0.6, 0.1))]
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        x, F, y, a, b, c = (rn(4, 3, 4, 5).contiguous(memory_format=fmt) for _ in range(6))
        cases += [("edm_scale_input", layout, (rg(x), sigma, 0.5)),
                  ("edm_denoise", layout, (rg(x), rg(F), sigma, 0.5)),
                  ("edm_loss", layout, (rg(x), rg(F), rg(y), sigma, 0.5)),
                  ("edm_loss_backward", layout, (torch.rand(4, device=dev), x, F, y, sigma, 0.5)),
                  ("heun_churn", layout, (a, b, 0.5, 0.7, 1.007)),
                  ("heun_euler", layout, (a, b, 1.3, 0.9)),
                  ("heun_correct", layout, (a, b, c, x, 1.3, 0.9))]
    return cases


def section_opcheck(args) -> list[dict]:
    import torch

    from cedm import ops

    if not ops.extension_available():
        raise RuntimeError(f"cedm._C not loaded: {ops._EXT_ERROR}")
    dev = torch.device(args.device)
    rows = []
    for dtype in (torch.float32,) if args.smoke else (torch.float32, torch.bfloat16):
        bad = []
        cases = _op_cases(dev, dtype)
        for name, layout, a in cases:
            try:
                torch.library.opcheck(getattr(torch.ops.cedm, name).default, a)
            except Exception as e:  # noqa: BLE001  (one failing op must not hide the others)
                bad.append(f"{name}/{layout}: {str(e).splitlines()[0][:200]}")
        rows.append(_row(f"opcheck: 9 ops on {dev.type}, {str(dtype)[6:]}",
                         f"{len(cases) - len(bad)}/{len(cases)} pass", "all", "FAIL" if bad else "PASS",
                         "; ".join(bad) if bad else "schema, fake tensor, autograd registration, AOT "
                         "dispatch; contiguous + channels_last"))
    return rows


def section_ops(args) -> list[dict]:
    import torch

    from cedm import ops

    if not ops.extension_available():
        raise RuntimeError(f"cedm._C not loaded: {ops._EXT_ERROR}")
    dev = torch.device(args.device)
    small = args.smoke
    reps, warm = (3, 1) if small else (30, 5)
    rows = []
    g = torch.Generator(device=dev).manual_seed(0)

    def rn(*s, dtype=torch.float32):
        return torch.randn(*s, generator=g, device=dev, dtype=dtype)

    # TEMI loss fwd+bwd at the paper's sizes (H=50 heads, B=512 pairs)
    H, B = (4, 16) if small else (50, 512)
    for C in (100, 1000):
        z = rn(2, H, B, C).requires_grad_()
        qt = torch.softmax(rn(2, H, B, C) / 0.1, -1)
        prior = torch.full((H, C), 1.0 / C, device=dev)

        def temi(fn, z=z, qt=qt, prior=prior):
            return lambda: torch.autograd.grad(fn(z, qt, prior, 0.6, 0.1).sum(), z)

        t = _times({"ref": temi(ops.ref_temi_loss), "ours": temi(ops.temi_loss)}, dev, warm, reps)
        r = t["ref"][0] / t["ours"][0]
        rows.append(_row(f"op: TEMI loss fwd+bwd H={H} B={B} C={C} f32", f"{r:.2f}x eager",
                         "", "INFO", f"ours {_ms(t['ours'])}, eager {_ms(t['ref'])}"))

    # EDM preconditioning + loss fwd+bwd(F), CIFAR batch, f32 and bf16 channels_last
    shape = (8, 3, 8, 8) if small else (512, 3, 32, 32)
    for dtype, fmt in ((torch.float32, torch.contiguous_format), (torch.bfloat16, torch.channels_last)):
        y = rn(*shape).to(dtype).contiguous(memory_format=fmt)
        sigma = (rn(shape[0]) * 1.2 - 1.2).exp()
        x = (y.float() + sigma[:, None, None, None] * rn(*shape)).to(dtype).contiguous(memory_format=fmt)
        F = rn(*shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()

        def edm(scale, loss, x=x, F=F, y=y, sigma=sigma):
            def run():
                scale(x, sigma, 0.5)
                return torch.autograd.grad(loss(x, F, y, sigma, 0.5).sum(), F)
            return run

        t = _times({"ref": edm(ops.ref_edm_scale_input, ops.ref_edm_loss),
                    "ours": edm(ops.edm_scale_input, ops.edm_loss)}, dev, warm, reps)
        r = t["ref"][0] / t["ours"][0]
        lay = "channels_last" if fmt == torch.channels_last else "contiguous"
        rows.append(_row(f"op: EDM scale_input + loss fwd+bwd {'x'.join(map(str, shape))} {str(dtype)[6:]} {lay}",
                         f"{r:.2f}x eager", "", "INFO", f"ours {_ms(t['ours'])}, eager {_ms(t['ref'])}"))

    # Heun step (Euler + correction) at the sampler's size and dtype (float64 state)
    for dtype in (torch.float64, torch.float32):
        xh, d, xn, dn = (rn(*shape, dtype=dtype) for _ in range(4))

        def heun(eu, co, xh=xh, d=d, xn=xn, dn=dn):
            return lambda: (eu(xh, d, 1.3, 0.9), co(xh, d, xn, dn, 1.3, 0.9))

        t = _times({"ref": heun(ops.ref_heun_euler, ops.ref_heun_correct),
                    "ours": heun(ops.heun_euler, ops.heun_correct)}, dev, warm, reps)
        rows.append(_row(f"op: Heun step {'x'.join(map(str, shape))} {str(dtype)[6:]}",
                         f"{t['ref'][0] / t['ours'][0]:.2f}x eager", "", "INFO",
                         f"ours {_ms(t['ours'])}, eager {_ms(t['ref'])}"))

    # Bandwidth: a tensor far larger than the L2 cache; the step moves 8 tensors (euler reads 2,
    # writes 1; correct reads 4, writes 1), a copy moves 2
    n = (1 << 16) if small else (1 << 26)
    xh, d, xn, dn = (rn(n) for _ in range(4))
    dst = torch.empty_like(xh)
    t = _times({"step": lambda: (ops.heun_euler(xh, d, 1.3, 0.9), ops.heun_correct(xh, d, xn, dn, 1.3, 0.9)),
                "copy": lambda: dst.copy_(xh)}, dev, warm, reps)
    nb = n * 4
    bw_step, bw_copy = 8 * nb / t["step"][0], 2 * nb / t["copy"][0]
    frac = bw_step / bw_copy
    rows.append(_row(f"op: Heun step bandwidth / device copy bandwidth ({nb / 2**20:.3g} MiB tensors)",
                     f"{frac:.2f}", f">= {HEUN_BW_GOAL}", "PASS" if frac >= HEUN_BW_GOAL else "FAIL",
                     f"step {bw_step / 1e9:.0f} GB/s ({_ms(t['step'])}), copy {bw_copy / 1e9:.0f} GB/s "
                     f"({_ms(t['copy'])})"))
    return rows


def _cifar_net(args, dev):
    import torch

    from cedm.networks import build, network_kwargs

    preset, res = ("tiny", 16) if args.smoke else ("cifar", 32)
    torch.manual_seed(0)
    net = build(network_kwargs(preset, res, 10)).to(dev)
    return net, preset, res


def section_train(args) -> list[dict]:
    """One training step. mode 'ref': EDM's settings on the reference path (CEDM_OPS=reference
    set by the parent): fp32, contiguous, torch.optim.Adam, the loss through the reference ops,
    EDM's per-parameter nan_to_num and EMA loops. Otherwise ours: fused ops, channels_last, fused
    Adam, torch._foreach EMA, `mode` autocast precision."""
    import copy

    import torch

    from cedm import ops

    mode = args.mode
    dev = torch.device(args.device)
    ref = mode == "ref"
    if ref and ops.extension_available():
        raise RuntimeError("reference mode must run with CEDM_OPS=reference")
    torch.backends.cudnn.benchmark = True                      # as EDM's training loop
    if dev.type == "cuda":                                      # EDM: no TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    net, preset, res = _cifar_net(args, dev)
    net.train()
    batch = 4 if args.smoke else args.batch
    dtype = {"ref": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[mode]
    fmt = torch.contiguous_format if mode in ("ref", "fp32") else torch.channels_last
    net = net.to(memory_format=fmt)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    fused = dev.type == "cuda" and not ref
    opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **({"fused": True} if fused else {}))
    scaler = torch.amp.GradScaler(dev.type, enabled=dtype == torch.float16)
    g = torch.Generator(device=dev).manual_seed(0)
    y = (torch.rand(batch, 3, res, res, generator=g, device=dev) * 2 - 1).contiguous(memory_format=fmt)
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=dev) % 10, 10).float()
    aug = torch.zeros(batch, 9, device=dev)  # augment labels (no augmentation in this timing)
    beta = 0.5 ** (batch / 500_000)           # EMA half-life 0.5 Mimg (EDM's CIFAR setting)

    def step():
        sigma = (torch.randn(batch, generator=g, device=dev) * 1.2 - 1.2).exp()   # P_mean, P_std
        x = y + torch.randn(y.shape, generator=g, device=dev).contiguous(memory_format=fmt) * sigma[:, None, None, None]
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            F = net(x, sigma, labels, aug, return_F=True)
        loss = ops.edm_loss(x, F, y, sigma).sum() / batch
        scaler.scale(loss).backward()
        if ref:                                                  # EDM training_loop.py
            for p in params:
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if ref:
                for pe, pn in zip(ema_params, params):
                    pe.copy_(pn.detach().lerp(pe, beta))
            else:
                torch._foreach_lerp_(ema_params, params, 1 - beta)

    warm, reps = (1, 2) if args.smoke else (3, 10)
    t = _times({"step": step}, dev, warm, reps)["step"]
    return [_row(f"train-{mode}", f"{batch / t[0]:.1f} img/s", "", "INFO",
                 f"{preset} preset, batch {batch}, step {_ms(t)}"
                 + (f"; {EDM_SETTINGS}" if ref else f"; {mode}, {'channels_last' if fmt != torch.contiguous_format else 'contiguous'}, fused ops/Adam, foreach EMA"),
                 ) | {"metric": batch / t[0]}]


def section_sample(args) -> list[dict]:
    import torch

    from cedm import ops
    from cedm.sample import edm_sampler

    mode = args.mode
    dev = torch.device(args.device)
    ref = mode == "ref"
    if ref and ops.extension_available():
        raise RuntimeError("reference mode must run with CEDM_OPS=reference")
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    net, preset, res = _cifar_net(args, dev)
    net.eval().requires_grad_(False)
    dtype = None if ref else torch.bfloat16
    fmt = torch.contiguous_format if ref else torch.channels_last
    net = net.to(memory_format=fmt)
    batch = 4 if args.smoke else args.sample_batch
    steps = 3 if args.smoke else 18
    labels = torch.nn.functional.one_hot(torch.arange(batch, device=dev) % 10, 10).float()
    latents = torch.randn(batch, 3, res, res, generator=torch.Generator(device=dev).manual_seed(0), device=dev)

    @torch.no_grad()
    def denoise(x, t):
        sigma = torch.full((x.shape[0],), t, device=dev)
        with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return net(x.to(torch.float32).contiguous(memory_format=fmt), sigma, labels)

    t = _times({"run": lambda: edm_sampler(denoise, latents, num_steps=steps)}, dev,
               1, 1 if args.smoke else 2)["run"]
    per_50k = t[0] / batch * 50_000
    return [_row(f"sample-{mode}", f"{per_50k:.0f} s per 50k", "", "INFO",
                 f"{preset} preset, batch {batch}, {steps} Heun steps ({2 * steps - 1} network calls): "
                 f"{_ms(t)} per batch; " + ("fp32, reference ops" if ref else "bf16 autocast, channels_last, fused ops"))
            | {"metric": per_50k}]


def knn_cost(n: int, d: int, seconds: float, sizes=(1_000_000, 10_000_000)) -> tuple[float, dict]:
    """The cost model of cedm.knn.cosine_knn: exact brute force over symmetric blocks does
    N^2 D / 2 multiply-adds, so a measured rate (multiply-adds per second at N, D) gives the time
    at other N: (rate, {N: seconds}). README "Past one node" quotes it."""
    rate = n * n * d / 2 / seconds
    return rate, {m: m * m * d / 2 / rate for m in sizes}


def section_knn(args) -> list[dict]:
    import torch

    from cedm.knn import cosine_knn

    dev = torch.device(args.device)
    n, d, k = (3000, 64, 10) if args.smoke else (200_000, 768, 50)
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(0))
    cosine_knn(x[:2000], k, device=dev)                             # warm-up (kernels, allocator)
    t = _times({"run": lambda: cosine_knn(x, k, device=dev)}, dev, 0, 1 if args.smoke else 2)["run"]
    rate, at = knn_cost(n, d, t[0])
    return [_row(f"knn: exact cosine top-{k}, N={n} D={d} fp32", f"{t[0]:.2f} s", "", "INFO",
                 f"{rate / 1e12:.3f} T multiply-adds/s; at this rate 1M x {d}: {at[1_000_000] / 60:.1f} min, "
                 f"10M: {at[10_000_000] / 3600:.1f} h (N^2 D / 2; on the GPU the features, {4 * d} B a row, "
                 f"and one block of similarities must fit: 1M rows are {4 * d * 1e6 / 2**30:.1f} GiB)")
            | {"metric": rate}]


SECTION_FUNCS = {"build": section_build, "tests": section_tests, "opcheck": section_opcheck,
                 "ops": section_ops, "knn": section_knn, "train": section_train, "sample": section_sample}


# ----------------------------------------------------------------------------------------------
# Orchestration

def run_section(name: str, timeout: float, cmd: list[str], env: dict | None = None) -> list[dict]:
    """Run one section's child process with a time limit; its rows, or one FAIL row saying why
    (exit status and stderr tail, or the time limit). The child's process group is killed on
    timeout (pytest and make leave children)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        t0 = time.time()
        p = subprocess.Popen(cmd + ["--json", str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            so, se = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            return [_row(name, f"timed out after {timeout:.0f} s", "", "FAIL", SECTIONS.get(name, ("", ""))[1])]
        dt = time.time() - t0
        if p.returncode != 0 or not out.exists():
            err = (se or so or "").strip().splitlines()
            last = " | ".join(err[-3:])[-600:] if err else "no output"
            return [_row(name, f"error (exit {p.returncode})", "", "FAIL", last)]
        rows = json.loads(out.read_text())
        for r in rows:
            r.setdefault("section", name)
            r["seconds"] = round(dt, 1)
        return rows


def _derived(rows: list[dict]) -> list[dict]:
    """Ratios against the reference path (rows of train-* / sample-* carry a `metric`)."""
    m = {r["check"]: r["metric"] for r in rows if "metric" in r}
    out = []
    if "train-ref" in m:
        for mode in ("fp32", "bf16", "fp16"):
            k = f"train-{mode}"
            if k in m:
                r = m[k] / m["train-ref"]
                out.append(_row(f"train img/s, ours {mode} / reference at EDM's settings", f"{r:.2f}x",
                                f">= {TRAIN_GOAL}x", "PASS" if r >= TRAIN_GOAL else "FAIL",
                                f"{m[k]:.1f} vs {m['train-ref']:.1f} img/s"))
    if "sample-ref" in m and "sample-bf16" in m:
        r = m["sample-ref"] / m["sample-bf16"]
        out.append(_row("sampling, ours bf16 / reference fp32", f"{r:.2f}x", "", "INFO",
                        f"{m['sample-bf16']:.0f} vs {m['sample-ref']:.0f} s per 50k CIFAR samples"))
    return out


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| check | result | goal | status | note |", "|---|---|---|---|---|"]
    for r in rows:
        note = str(r.get("note", "")).replace("|", "/").replace("\n", " ")
        lines.append(f"| {r['check']} | {r['result']} | {r.get('goal', '')} | {r['status']} | {note} |")
    n_fail = sum(r["status"] == "FAIL" for r in rows)
    lines += ["", f"{n_fail} FAIL, {sum(r['status'] == 'PASS' for r in rows)} PASS"]
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only with --smoke")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (a test of this script)")
    ap.add_argument("--only", default=None, help="comma-separated sections to run (default: all)")
    ap.add_argument("--no-build", action="store_true", help="use the cedm._C already built")
    ap.add_argument("--batch", type=int, default=256, help="training batch (default: %(default)s)")
    ap.add_argument("--sample-batch", type=int, default=1000, help="sampling batch (default: %(default)s)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)   # child process
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--logdir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.section:  # child: run one section, write its rows
        rows = SECTION_FUNCS[args.section](args)
        _write_atomic(Path(args.json), json.dumps(rows))
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible to torch (torch.cuda.is_available() is False; "
              f"torch {torch.__version__}, built with CUDA {torch.version.cuda}); nothing was run. "
              "Run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    if args.device == "cpu" and not args.smoke:
        print("gpu-check: --device cpu is only for --smoke (a test of this script)", file=sys.stderr)
        return 2

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    logdir = out_dir or Path(tempfile.mkdtemp(prefix="gpu_check_"))
    logdir.mkdir(parents=True, exist_ok=True)
    names = list(SECTIONS)
    if args.only:
        names = [n for n in names if n in args.only.split(",")]
    if args.no_build or args.smoke:
        names = [n for n in names if n != "build"]
    if args.smoke:
        names = [n for n in names if n != "tests"]

    if args.device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        what = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}"
    else:
        what = "CPU smoke run (toy sizes; not a GPU measurement)"
    header = (f"# cedm gpu-check: {what}\n\ntorch {torch.__version__} (CUDA {torch.version.cuda}), "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}; times are medians [min-max] "
              f"({'CUDA events' if args.device.startswith('cuda') else 'wall clock'})")
    print(header.splitlines()[0], flush=True)
    rows, t_start = [], time.time()
    base = [sys.executable, "-m", "benchmarks.gpu_check", "--device", args.device, "--logdir", str(logdir),
            "--batch", str(args.batch), "--sample-batch", str(args.sample_batch)] + (["--smoke"] if args.smoke else [])
    for name in names:
        limit, what = SECTIONS[name]
        left = TOTAL_BUDGET_S - (time.time() - t_start)
        if left < 15:
            rows.append(_row(name, "not run", "", "SKIP", f"the check's {TOTAL_BUDGET_S} s budget was spent"))
            continue
        kind, _, mode = name.partition("-")
        env = dict(os.environ)
        if mode == "ref":
            env["CEDM_OPS"] = "reference"
        else:
            env.pop("CEDM_OPS", None)
        cmd = base + ["--section", kind] + (["--mode", mode] if mode else [])
        print(f"== {name}: {what} (limit {min(limit, left):.0f} s)", flush=True)
        got = run_section(name, min(limit, left), cmd, env)
        for r in got:
            print(f"   {r['status']:5s} {r['check']}: {r['result']}", flush=True)
        rows += got
    rows += _derived(rows)
    text = table(rows, header) + f"\ntotal {time.time() - t_start:.0f} s\n"
    print()
    print(text)
    if out_dir:
        _write_atomic(out_dir / "gpu_check.md", text)
        print(f"wrote {out_dir / 'gpu_check.md'}")
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # a child's crash: the traceback on stderr for the parent's FAIL row
        traceback.print_exc()
        sys.exit(1)
