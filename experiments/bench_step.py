"""Benchmark: seconds per MAML meta-step on sinusoid, metaopt vs references, same run.

One meta-step = the second-order meta-gradient of the mean outer loss over a
meta-batch of 25 sinusoid tasks (K = 10, MLP 1-40-40-1, inner SGD lr 0.01), for T
inner steps. Implementations, all computing the same gradient (checked here):

  metaopt        metaopt.Full() with batching="auto" (vmap over tasks)
  metaopt-loop   metaopt.Full() with batching="loop" (one task graph at a time)
  torch.func     a minimal hand-written functional_call + grad + vmap reference
  higher         higher 0.2.1's innerloop_ctx, looping over tasks in Python
  with --compile:
  metaopt-comp   metaopt.Full() compiled (`mo.get_estimator("full", compile=True)`: the whole
                 meta-gradient of a chunk as one torch.compile'd function; "auto" vmaps its chunks)
  metaopt-comp-vmap, metaopt-comp-stacked  the same with batching="vmap" / "stacked" (on request with
                 --only: the stacked trace of the chunk, the compiled default until stop 36)
  torch.func-comp  the hand-written reference's meta-gradient (torch.func.grad of the vmapped
                 objective) under torch.compile(fullgraph=True), torch's default options
  torch.func-comp-filtered  the same with metaopt's guard policy (`options={"guard_filter_fn":
                 metaopt.compiled.library_guard_filter}`: no guards on torch's globals; on request with --only)
  torchopt       TorchOpt's MAML recipe (its few-shot example): `torchopt.MetaSGD` steps the module in place,
                 task by task, the outer gradient accumulated by backward (when installed: `pip install torchopt`
                 with torch already there; TorchOpt 0.7.3 runs on torch 2.13 without its C++ ops)
`--no-higher` leaves out both task-by-task references (higher, torchopt).
Compile time is paid in the (untimed) warm-up call and printed separately.

Timings are interleaved: each round runs every implementation once, in a freshly
shuffled (seeded) order, so drift on a shared machine hits all alike and no
implementation always runs right after another; the table gives the median over
rounds and each one's ratio to torch.func.

    python experiments/bench_step.py [--steps 1 5 20] [--repeats 30] [--threads 2] [--compile] [--only NAME ...]

--only times some implementations (torch.func, the reference, always runs; `metaopt-comp-vmap`,
`metaopt-comp-stacked`, `metaopt-aot-vmap`, `metaopt-aot-stacked` (compiled with `backend="aot_eager"`: the traced
graph on eager's kernels) and `torch.func-comp-filtered` run on request only): e.g. `--only metaopt-comp
torch.func-comp` alternates the compiled functions with no `higher` or task-by-task rounds between them, whose
tens of milliseconds of Python-heavy work leave the caches cold for the next call (fixed per-call costs then
weigh more: see README).

With --compile the last line is `speedup_vs_hand_eager_vmap T=1:<x> T=5:<x> T=20:<x>`: the
median of hand-written eager vmap over the median of metaopt compiled, same interleaved run.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import random
import statistics
import time
from typing import Callable

import torch
from torch.func import functional_call, grad, vmap

import metaopt as mo
from metaopt.compiled import Compiled, library_guard_filter, with_own_code

LR, META_BATCH, K = 0.01, 25, 10
NAMES = ["metaopt", "metaopt-vmap", "metaopt-loop", "torch.func", "metaopt-comp", "metaopt-comp-vmap",
         "metaopt-comp-stacked", "metaopt-aot-vmap", "metaopt-aot-stacked", "torch.func-comp", "torch.func-comp-filtered",
         "higher", "torchopt"]


# Each make_* builds one implementation of MAML's meta-gradient (`loss`: inner and outer loss, `lr`: inner lr);
# experiments/bench_gpu.py reuses them for conv4 classification.


def make_metaopt(model, tasks, batching, compile=False, loss=mo.losses.mse, lr=LR, mode=None, backend="inductor"):
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=lr), loss)
    meta = mo.meta_params(mo.Init(model))
    estimator = mo.get_estimator("full", compile=compile)
    if compile and (mode is not None or backend != "inductor"):  # e.g. "reduce-overhead", "cudagraphs"
        estimator = Compiled(mo.get_estimator("full"), mode=mode, backend=backend)

    names = ["init.params." + n.replace(".", "/") for n, _ in model.named_parameters()]  # once: not part of a step

    def step():
        g = estimator(loop, meta, tasks, batching=batching).grads
        return [g[k] for k in names]
    step.estimator = estimator  # type: ignore[attr-defined]  # callers read a compiled one's fallback_reason
    return step


def make_torch_func(model, tasks, loss=mo.losses.mse, lr=LR):
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    xs, ys = tasks.support[0]
    xq, yq = tasks.query
    steps = tasks.inner_steps

    def task_loss(xs, ys, xq, yq):
        p = params
        for _ in range(steps):
            g = grad(lambda p: loss(functional_call(model, p, (xs,)), ys))(p)
            p = {k: p[k] - lr * g[k] for k in p}
        return loss(functional_call(model, p, (xq,)), yq)

    def step():
        loss = vmap(task_loss)(xs, ys, xq, yq).mean()
        return list(torch.autograd.grad(loss, list(params.values())))
    return step


def make_torch_func_compiled(model, tasks, loss=mo.losses.mse, lr=LR, mode=None, options=None):
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    xs, ys = tasks.support[0]
    xq, yq = tasks.query
    steps = tasks.inner_steps

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(steps):
            g = grad(lambda p: loss(functional_call(model, p, (xs,)), ys))(p)
            p = {k: p[k] - lr * g[k] for k in p}
        return loss(functional_call(model, p, (xq,)), yq)

    def meta_loss(p, xs, ys, xq, yq):
        return vmap(task_loss, in_dims=(None, 0, 0, 0, 0))(p, xs, ys, xq, yq).mean()

    meta_gradient = grad(meta_loss)
    if options is not None:  # the first compilation's options would win in a shared code object's cache
        meta_gradient = with_own_code(meta_gradient)
    compiled = torch.compile(meta_gradient, fullgraph=True, mode=mode, options=options)

    def step():
        g = compiled(params, xs, ys, xq, yq)
        if mode is not None and "reduce-overhead" in mode:  # CUDA graphs reuse their output buffers: copies
            return [g[k].clone() for k in params]
        return [g[k] for k in params]
    return step


def make_higher(model, tasks, loss=mo.losses.mse, lr=LR):
    import higher
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    per_task = mo.unstack_tasks(tasks)

    def step():
        total = 0.0
        for task in per_task:
            with higher.innerloop_ctx(model, opt, copy_initial_weights=False) as (fmodel, diffopt):
                for batch in task.support:
                    diffopt.step(loss(fmodel(batch.x), batch.y))
                total = total + loss(fmodel(task.query.x), task.query.y)
        return list(torch.autograd.grad(total / len(per_task), list(model.parameters())))
    return step


def make_torchopt(model, tasks, loss=mo.losses.mse, lr=LR):
    import torchopt
    net = copy.deepcopy(model)  # MetaSGD replaces the module's parameters: its own copy, recovered after each task
    params = list(net.parameters())
    inner = torchopt.MetaSGD(net, lr=lr)
    net_state, inner_state = torchopt.extract_state_dict(net), torchopt.extract_state_dict(inner)
    per_task = mo.unstack_tasks(tasks)

    def step():
        for p in params:
            p.grad = None
        for task in per_task:
            for batch in task.support:
                inner.step(loss(net(batch.x), batch.y))
            (loss(net(task.query.x), task.query.y) / len(per_task)).backward()
            torchopt.recover_state_dict(net, net_state)
            torchopt.recover_state_dict(inner, inner_state)
        return [p.grad for p in params]
    return step


def task_by_task_references(model, tasks, loss=mo.losses.mse, lr=LR) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """higher's and TorchOpt's meta-steps, those installed."""
    makers = {"higher": make_higher, "torchopt": make_torchopt}
    found = {name: importlib.util.find_spec(name) is not None for name in makers}
    return {name: make(model, tasks, loss=loss, lr=lr) for name, make in makers.items() if found[name]}


def is_compiled(name: str) -> bool:
    return "-comp" in name or "-aot" in name


def bench(steps: int, repeats: int, with_higher: bool, with_compile: bool = False,
          only: list[str] | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    model = mo.MLP(1, (40, 40), 1)
    tasks = mo.Sinusoid(k_shot=K).sample(META_BATCH, steps, torch.Generator().manual_seed(0))
    impls: dict[str, Callable[[], list[torch.Tensor]]] = {
        "metaopt": make_metaopt(model, tasks, "auto"),
        "metaopt-vmap": make_metaopt(model, tasks, "vmap"),
        "metaopt-loop": make_metaopt(model, tasks, "loop"),
        "torch.func": make_torch_func(model, tasks),
    }
    if with_compile:
        impls["metaopt-comp"] = make_metaopt(model, tasks, "auto", compile=True)
        for batching in ("vmap", "stacked"):  # on request only: one more compilation per T
            if only and f"metaopt-comp-{batching}" in only:
                impls[f"metaopt-comp-{batching}"] = make_metaopt(model, tasks, batching, compile=True)
            if only and f"metaopt-aot-{batching}" in only:  # the traced graph run with eager's kernels
                impls[f"metaopt-aot-{batching}"] = make_metaopt(model, tasks, batching, compile=True,
                                                                 backend="aot_eager")
        impls["torch.func-comp"] = make_torch_func_compiled(model, tasks)
        if only and "torch.func-comp-filtered" in only:
            impls["torch.func-comp-filtered"] = make_torch_func_compiled(
                model, tasks, options={"guard_filter_fn": library_guard_filter})
    if with_higher:
        impls.update(task_by_task_references(model, tasks))
    if only:
        impls = {name: fn for name, fn in impls.items() if name in only or name == "torch.func"}
    reference = impls["torch.func"]()
    for name, fn in impls.items():  # same gradient, and warm-up (compiling, for the compiled ones)
        start = time.perf_counter()
        for a, b in zip(fn(), reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=f"{name} differs from torch.func")
        if is_compiled(name):
            print(f"  T={steps}: {name} compiled in {time.perf_counter() - start:.1f} s (first call)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    shuffler = random.Random(steps)
    for _ in range(repeats):
        shuffler.shuffle(order)
        for name in order:
            start = time.perf_counter()
            impls[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-higher", action="store_true")
    parser.add_argument("--compile", action="store_true", help="add the compiled implementations")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="time these (and torch.func, the reference) only")
    args = parser.parse_args()
    if args.only and any(is_compiled(name) for name in args.only) and not args.compile:
        parser.error("--only names a compiled implementation: add --compile")
    torch.set_num_threads(args.threads)
    print(f"median seconds per meta-step (meta-batch {META_BATCH}, K={K}, {args.repeats} repeats, "
          f"{args.threads} threads, torch {torch.__version__})")
    print(f"{'T':>3} {'implementation':<24} {'median s':>10} {'vs torch.func':>14} {'speed-up vs higher':>19} "
          f"{'speed-up vs torchopt':>21}")
    speedups = []
    for steps in args.steps:
        medians = bench(steps, args.repeats, not args.no_higher, args.compile, args.only)
        for name, seconds in medians.items():
            vs = {ref: f"{medians[ref] / seconds:.1f}x" if ref in medians else "-" for ref in ("higher", "torchopt")}
            print(f"{steps:>3} {name:<24} {seconds:>10.5f} {seconds / medians['torch.func']:>13.2f}x "
                  f"{vs['higher']:>19} {vs['torchopt']:>21}")
        if "metaopt-comp" in medians:
            speedups.append(f"T={steps}:{medians['torch.func'] / medians['metaopt-comp']:.2f}")
        if {"metaopt-comp", "torch.func-comp"} <= set(medians):
            print(f"    T={steps}: metaopt compiled is {medians['torch.func-comp'] / medians['metaopt-comp']:.2f}x "
                  f"the hand-written compiled speed", flush=True)
    if speedups:
        print("speedup_vs_hand_eager_vmap " + " ".join(speedups))


if __name__ == "__main__":
    main()
