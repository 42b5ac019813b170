"""MAML meta-iteration speed: metassl against learn2learn, higher and a bare functional loop.

    python experiments/bench_maml_speed.py [--threads 2] [--rounds 5] [--meta-batch 32] [--device cpu]

One meta-iteration: Conv-4 (64 channels, per-sample LayerNorm, linear head), 28x28 inputs,
5-way 1-shot, 15 queries per class, one inner SGD step (lr 0.4) on the support set, the
query loss of the adapted weights averaged over a meta-batch of 32 tasks, and the
meta-gradient of that loss with respect to the initial weights: second order unless stated.
Every method runs the same `nn.Module` on the same random inputs, and the script checks
that each one's meta-gradient equals its bare reference's before timing anything: a method
whose largest gradient error, relative to the reference's largest entry, exceeds
`--tolerance` stops the run. `--only "NAME;NAME"` times the named methods only (exact
names from the table, `;`-separated).

Timings are medians over `--rounds` rounds; within a round every method runs once (after
one untimed warm-up iteration each), the order alternating between rounds so that no method
always goes first. Peak memory is each method's resident-set growth in a process of its own
(CPU) or the allocator's peak (CUDA); it compares what each method keeps alive until the outer
backward (higher and learn2learn keep every task's graph, metassl's default keeps the
inner-loop graphs only), not the cost of the same work.

The peers are installed by the script into a virtual environment of its own
(`--env`, default `runs/bench/peers-env`), which sees this interpreter's packages through a
`.pth` file: higher 0.2.1 from PyPI (pure Python), and learn2learn 0.2.0's `algorithms/maml.py`,
`algorithms/base_learner.py` and `utils/__init__.py` unchanged from its source archive
(sha256-checked). learn2learn's compiled extension is not built: it does not build on current
Pythons and MAML does not use it. `--peers-from DIR` takes the archive from a folder instead
of PyPI (offline machines).
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import time
import urllib.request
import venv
from pathlib import Path

L2L_VERSION = "0.2.0"
L2L_SHA256 = "69f1d7cb0d0a6be7a2c6ad8e83e2ebbe70fb05e51d61e45e63078b40c75ea419"
L2L_FILES = ("learn2learn/algorithms/maml.py", "learn2learn/algorithms/base_learner.py",
             "learn2learn/utils/__init__.py")
HIGHER_VERSION = "0.2.1"
ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- peers' environment

def _fetch_l2l_archive(peers_from: str | None) -> bytes:
    name = f"learn2learn-{L2L_VERSION}.tar.gz"
    if peers_from:
        data = (Path(peers_from) / name).read_bytes()
    else:
        req = urllib.request.Request("https://pypi.org/simple/learn2learn/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            files = json.load(r)["files"]
        url = next(f["url"] for f in files if f["filename"] == name)
        with urllib.request.urlopen(url, timeout=120) as r:
            data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != L2L_SHA256:
        raise SystemExit(f"{name}: sha256 {digest} is not the published {L2L_SHA256}")
    return data


def make_env(env: Path, peers_from: str | None) -> Path:
    """Create (once) the peers' virtual environment and return its Python."""
    py = env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip()) if py.exists() else None
    if site is not None and (site / "learn2learn" / "algorithms" / "maml.py").exists() and (site / "higher").exists():
        return py
    print(f"installing learn2learn {L2L_VERSION} (MAML sources) and higher {HIGHER_VERSION} into {env}", flush=True)
    venv.EnvBuilder(with_pip=False, clear=True).create(env)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # torch and metassl come from this interpreter's environment
    (site / "_bench_parent.pth").write_text(sysconfig.get_paths()["purelib"] + "\n" + str(ROOT) + "\n")
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site)]
    if peers_from:
        pip += ["--no-index", "--find-links", peers_from]
    subprocess.check_call(pip + [f"higher=={HIGHER_VERSION}"])
    archive = tarfile.open(fileobj=io.BytesIO(_fetch_l2l_archive(peers_from)), mode="r:gz")
    prefix = f"learn2learn-{L2L_VERSION}/"
    for rel in L2L_FILES:
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(archive.extractfile(prefix + rel).read())
    # the package's own __init__ files import the compiled extension and every subpackage;
    # MAML needs none of that, so its packages get empty ones
    for pkg in ("learn2learn", "learn2learn/algorithms"):
        (site / pkg / "__init__.py").write_text("")
    return py


# --------------------------------------------------------------------------- the methods

def _setup(args):
    import torch

    from metassl.data.episodes import Episode
    from metassl.models.backbones import Conv4

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Conv4(1, 64, "layer", args.n_way, 28).to(device)
    g = torch.Generator().manual_seed(1)
    t, n, k, q = args.meta_batch, args.n_way, args.k_shot, args.n_query
    batch = Episode(torch.rand(t, n * k, 1, 28, 28, generator=g),
                    torch.arange(n).repeat_interleave(k).repeat(t, 1),
                    torch.rand(t, n * q, 1, 28, 28, generator=g),
                    torch.arange(n).repeat_interleave(q).repeat(t, 1), batched=True).to(device)
    return model, batch


def methods(model, batch, args):
    """name -> function returning the meta-gradient (a list in `model.parameters()` order)."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from metassl.meta.maml import MAML

    names = [k for k, _ in model.named_parameters()]
    t = batch.support_x.shape[0]
    lr = 0.4

    def l2l(first_order):
        from learn2learn.algorithms.maml import MAML as L2LMAML

        maml = L2LMAML(model, lr=lr, first_order=first_order)

        def run():
            model.zero_grad(set_to_none=True)
            total = 0.0
            for i in range(t):
                learner = maml.clone()
                learner.adapt(F.cross_entropy(learner(batch.support_x[i]), batch.support_y[i]))
                total = total + F.cross_entropy(learner(batch.query_x[i]), batch.query_y[i])
            (total / t).backward()
            return [p.grad for p in model.parameters()]
        return run

    def higher_(first_order):
        import higher

        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def run():
            model.zero_grad(set_to_none=True)
            for i in range(t):
                with higher.innerloop_ctx(model, opt, copy_initial_weights=False,
                                          track_higher_grads=not first_order) as (fmodel, diffopt):
                    diffopt.step(F.cross_entropy(fmodel(batch.support_x[i]), batch.support_y[i]))
                    (F.cross_entropy(fmodel(batch.query_x[i]), batch.query_y[i]) / t).backward()
            return [p.grad for p in model.parameters()]
        return run

    def bare(first_order):
        params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}

        def run():
            total = 0.0
            for i in range(t):
                p = params
                loss = F.cross_entropy(functional_call(model, p, (batch.support_x[i],)), batch.support_y[i])
                grads = torch.autograd.grad(loss, list(p.values()), create_graph=not first_order)
                p = {k: v - lr * g for (k, v), g in zip(p.items(), grads)}
                total = total + F.cross_entropy(functional_call(model, p, (batch.query_x[i],)), batch.query_y[i])
            return list(torch.autograd.grad(total / t, list(params.values())))
        return run

    def metassl(first_order, **switches):
        learner = MAML(inner_lr=lr, first_order=first_order, **switches)
        params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}

        def run():
            out = learner.meta_step(model, params, {}, batch)
            return list(torch.autograd.grad(out.loss, [params[k] for k in names]))
        return run

    def protonet(bare_):
        from metassl.meta.protonet import ProtoNet

        body = model.features
        params = {k: v.detach().requires_grad_() for k, v in body.named_parameters()}
        n = args.n_way

        def run_metassl():
            out = ProtoNet().meta_step(body, params, {}, batch)
            return list(torch.autograd.grad(out.loss, list(params.values())))

        def run_bare():
            total = 0.0
            for i in range(t):
                s = functional_call(body, params, (batch.support_x[i],))
                qe = functional_call(body, params, (batch.query_x[i],))
                protos = s.view(n, -1, s.shape[-1]).mean(1)
                total = total + F.cross_entropy(-torch.cdist(qe, protos).pow(2), batch.query_y[i])
            return list(torch.autograd.grad(total / t, list(params.values())))
        return run_bare if bare_ else run_metassl

    table = {
        "learn2learn MAML": l2l(False),
        "higher": higher_(False),
        "bare functional loop": bare(False),
    }
    for label, switches in SPEED_PATHS.items():
        table[f"metassl {label}"] = metassl(False, **switches)
    table.update({
        "learn2learn MAML, first order": l2l(True),
        "bare functional loop, first order": bare(True),
        "metassl first order, reference path": metassl(True, **SPEED_PATHS["reference path"]),
        "metassl first order, default": metassl(True, **SPEED_PATHS["default"]),
        "ProtoNet, bare loop": protonet(True),
        "ProtoNet, metassl": protonet(False),
    })
    return table


# the metassl configurations timed: label -> MAML keyword switches
SPEED_PATHS = {
    "reference path": {"split_query": False},
    "default": {},
}

REFERENCE = {  # which bare computation each method's gradient is checked against
    "first order": "bare functional loop, first order",
    "ProtoNet": "ProtoNet, bare loop",
}


def _reference_of(name: str) -> str:
    for key, ref in REFERENCE.items():
        if key in name:
            return ref
    return "bare functional loop"


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model, batch = _setup(args)
    table = methods(model, batch, args)
    names = list(table)
    if args.only:
        names = list(dict.fromkeys(n.strip() for n in args.only.split(";") if n.strip()))
        unknown = [n for n in names if n not in table]
        if unknown:
            sys.exit(f"--only: unknown method(s) {unknown}; the methods are: {'; '.join(table)}")

    # correctness first: every method's meta-gradient against its bare reference
    grads = {}
    for name in names:
        grads[name] = [g.detach().clone() for g in table[name]()]
    errors = {}
    for name in names:
        ref = _reference_of(name)
        if ref not in grads:
            grads[ref] = [g.detach().clone() for g in table[ref]()]
        num = max(float((a - b).abs().max()) for a, b in zip(grads[name], grads[ref]))
        den = max(float(b.abs().max()) for b in grads[ref])
        errors[name] = num / den
    bad = {n: e for n, e in errors.items() if not e <= args.tolerance}
    if bad:
        sys.exit("meta-gradient mismatch, nothing timed: " + "; ".join(
            f"{n}: max rel. error {e:.1e} against {_reference_of(n)} (tolerance {args.tolerance:.0e})"
            for n, e in bad.items()))
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(args.device)
            t0 = time.perf_counter()
            table[name]()
            _sync(args.device)
            times[name].append(time.perf_counter() - t0)
    result = {n: {"median_ms": 1000 * statistics.median(times[n]), "rounds_ms": [1000 * x for x in times[n]],
                  "max_rel_error": errors[n], "reference": _reference_of(n)} for n in names}
    print(json.dumps(result))


def peak_memory(args, name: str) -> float:
    """MiB a method's meta-iteration adds to a fresh process (CPU RSS growth, or CUDA allocator peak)."""
    import resource

    import torch

    torch.set_num_threads(args.threads)
    model, batch = _setup(args)
    fn = methods(model, batch, args)[name]
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


# --------------------------------------------------------------------------- driver

def _child(py: Path, mode: str, passthrough: list[str]) -> dict:
    """Run this script in the peers' environment; its last stdout line is JSON. On failure, show its stderr."""
    out = subprocess.run([str(py), __file__, mode, *passthrough], capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        sys.exit(f"{mode} failed (exit status {out.returncode}): see its output above")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--n-way", type=int, default=5)
    p.add_argument("--k-shot", type=int, default=1)
    p.add_argument("--n-query", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", help="exact method names to time, ';'-separated")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest meta-gradient error allowed, relative to the reference's largest entry")
    p.add_argument("--env", default=str(ROOT / "runs" / "bench" / "peers-env"))
    p.add_argument("--peers-from", help="folder holding the peers' archives (offline)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    p.add_argument("--_measure", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_memory", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._measure:
        return measure(args)
    if args._memory:
        return print(json.dumps({"mib": peak_memory(args, args._memory)}))

    py = make_env(Path(args.env), args.peers_from)
    passthrough = [f"--threads={args.threads}", f"--rounds={args.rounds}", f"--meta-batch={args.meta_batch}",
                   f"--n-way={args.n_way}", f"--k-shot={args.k_shot}", f"--n-query={args.n_query}",
                   f"--device={args.device}", f"--tolerance={args.tolerance}"]
    passthrough += [f"--only={args.only}"] if args.only else []
    result = _child(py, "--_measure", passthrough)
    if not args.no_memory:
        for name in result:
            result[name]["peak_mib"] = _child(py, f"--_memory={name}", passthrough)["mib"]
    info = subprocess.run([str(py), "-c", "import torch; print(torch.__version__, torch.backends.cpu.get_cpu_capability())"],
                          capture_output=True, text=True).stdout.strip()
    base = result.get("learn2learn MAML", {}).get("median_ms")
    print(f"\n## MAML meta-iteration: Conv-4, 28x28, {args.n_way}-way {args.k_shot}-shot, {args.n_query} queries "
          f"per class, one inner step, meta-batch {args.meta_batch}, {args.device}, {args.threads} threads")
    print(f"- command: `python experiments/bench_maml_speed.py {shlex.join(sys.argv[1:])}` "
          f"(in full: {shlex.join(passthrough)})")
    print(f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {info}, Python {platform.python_version()}; "
          f"{datetime.date.today()}; median of {args.rounds} alternating rounds")
    print("| method | ms per meta-iteration (median) | learn2learn / method | peak MiB | gradient: max rel. error vs |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name, r in result.items():
        ratio = f"{base / r['median_ms']:.2f}x" if base and "ProtoNet" not in name and "first order" not in name else ""
        if "first order" in name and "learn2learn MAML, first order" in result:
            ratio = f"{result['learn2learn MAML, first order']['median_ms'] / r['median_ms']:.2f}x"
        mem = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
        err = "" if name == r["reference"] else f"{r['max_rel_error']:.1e} ({r['reference']})"
        print(f"| {name} | {r['median_ms']:.0f} | {ratio} | {mem} | {err} |")
    print("rounds (ms): " + "; ".join(f"{n}: " + ", ".join(f"{x:.0f}" for x in r["rounds_ms"])
                                      for n, r in result.items()))


if __name__ == "__main__":
    main()
