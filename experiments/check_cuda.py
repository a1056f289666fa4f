"""Check the CUDA path: exactness, memory prediction vs torch.cuda.max_memory_allocated, budgets, speed.

    python experiments/check_cuda.py [--steps 50]

1. Meta-gradients on CUDA (float64) equal the CPU's for several kinds, and exact estimators
   (checkpoint, truncated k=T) equal full on CUDA.
2. MAML on 5-way 1-shot conv4-64 images (16 tasks, vmapped) meta-trains on CUDA: seconds per
   meta-step (median) against the same on CPU measured in this run, and the planner's predicted
   peak against the measured one (memory method "cuda": torch.cuda.max_memory_allocated).
3. The compiled meta-gradient (`compile=True`) on CUDA equals eager in float64 (1e-9).
4. A memory budget below full's prediction is refused before any work (BudgetExceeded), and
   `auto` under it picks an estimator whose measured peak fits.
5. Omniglot's tasks gathered on the device (`Omniglot.to`) equal the CPU's (generated images).
6. `Conv4(conv="matmul")` (im2col and a GEMM) gives native conv4's MAML meta-gradient on CUDA (float64,
   vmapped and stacked) and the CPU's.
7. `meta_train(prefetch=True)` on CUDA (batches drawn ahead on a worker thread and a side stream) trains to
   the parameters that drawing in turn gives (float64, Omniglot's sampler on the device).
8. `meta_train(overlap=True)` on CUDA (Adam stepped before the flag is read, the flag copied to pinned memory
   behind an event and read a step late; a non-finite step undone) trains to the parameters the synchronous
   loop gives, with a task made non-finite in two steps' batches (float64, on_nan="skip").
9. `Compiled(backend="cudagraphs")` (the traced graph on eager's kernels, replayed as CUDA graphs) over
   `Conv4(conv="matmul")` equals eager in float64 at each of four calls, the meta-parameters stepped in place
   between calls as an optimizer does (a replay must read them anew), and says whether CUDA graphs were skipped;
   then meta_train with it: the measured peak against the planner's prediction (0.7-1.5x, as check 2).
Prints one line per check and exits non-zero if a check fails.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable

import torch

import metaopt as mo
from metaopt import planning
from metaopt.compiled import Compiled, gradient_errors
from metaopt.guard import format_bytes
from metaopt.memory import measure_peak_memory
from metaopt.tasks import TaskDistribution
from metaopt.train import task_to
from metaopt.types import MetaParams
from bench_gpu import generated_omniglot

DEVICE = "cuda"


KINDS: dict[str, Callable[[torch.nn.Module], MetaParams]] = {
    "init+lrs": lambda m: mo.meta_params(mo.Init(m), mo.LearningRates(m, init=0.1, granularity="tensor")),
    "learned_optimizer": lambda m: mo.meta_params(mo.LearnedOptimizer(m, "lstm", hidden=4, base="adam", base_lr=0.05)),
    "learned_loss": lambda m: mo.meta_params(mo.LearnedLoss(m, pred_features=1, input_features=1, mode="replace")),
}


def check_exactness(failures: list[str]) -> None:
    torch.set_default_dtype(torch.float64)
    for kind, make in KINDS.items():
        torch.manual_seed(0)
        model = mo.MLP(1, (16, 16), 1, activation="tanh")
        meta = make(model)
        tasks = mo.Sinusoid(k_shot=5, k_query=7).sample(4, 5, torch.Generator().manual_seed(1))
        loop = mo.InnerLoop(model, mo.optim.momentum(0.05, 0.5), mo.losses.mse)
        cpu = mo.Full()(loop, meta, tasks).grads
        meta_cuda, model_cuda = meta.to(DEVICE), model.to(DEVICE)
        loop_cuda = mo.InnerLoop(model_cuda, mo.optim.momentum(0.05, 0.5), mo.losses.mse)
        tasks_cuda = task_to(tasks, DEVICE)
        full = mo.Full()(loop_cuda, meta_cuda, tasks_cuda).grads
        worst = max(((full[k].cpu() - g).abs().max() / g.abs().max().clamp_min(1e-12)).item() for k, g in cpu.items())
        for estimator in (mo.Checkpoint(segment=2), mo.Truncated(k=5)):
            other = estimator(loop_cuda, meta_cuda, tasks_cuda).grads
            worst = max(worst, max(((other[k] - g).abs().max() / g.abs().max().clamp_min(1e-12)).item()
                                   for k, g in full.items()))
        ok = worst < 1e-8
        print(f"exactness {kind}: CUDA full vs CPU full and checkpoint/truncated vs full, max rel. error {worst:.1e} "
              f"{'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"exactness {kind}")
    torch.set_default_dtype(torch.float32)


def check_compiled_float64(failures: list[str]) -> None:
    """The compiled meta-gradient on CUDA equals eager in float64 (the float32 check tolerates kernel noise)."""
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = mo.Conv4(out_features=5, channels=16).to(DEVICE)
    loop = mo.InnerLoop(model, mo.optim.sgd(0.4), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model)).to(DEVICE)
    batch = task_to(mo.RandomPatterns(n_way=5, k_shot=1, k_query=5).sample(4, 2, torch.Generator().manual_seed(0)),
                    DEVICE)
    compiled = Compiled(mo.Full())
    got, want = compiled(loop, meta, batch).grads, mo.Full()(loop, meta, batch).grads
    worst = max(gradient_errors(got, want).values())
    ok = compiled.fallback_reason is None and compiled.compiled_calls > 0 and worst <= 1e-9
    print(f"compiled full on CUDA, float64 conv4-16, T=2: relative error {worst:.1e} vs eager, compile "
          f"{compiled.compile_seconds:.0f} s, fallback: {compiled.fallback_reason} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("compiled float64")
    torch.set_default_dtype(torch.float32)


def maml_problem(device: str):
    torch.manual_seed(0)
    model = mo.Conv4(out_features=5, channels=64).to(device)
    loop = mo.InnerLoop(model, mo.optim.sgd(0.4), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model)).to(device)
    return loop, meta, mo.RandomPatterns(n_way=5, k_shot=1, k_query=5)


def seconds_per_step(device: str, steps: int) -> tuple[float, dict]:
    loop, meta, tasks = maml_problem(device)
    metrics = mo.meta_train(loop, meta, mo.Full(), tasks, outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                            meta_steps=steps, meta_batch_size=16, inner_steps=1, eval_n_tasks=0, progress=False,
                            device=device, log_every=max(1, steps // 5))
    return metrics["seconds_per_meta_step"], metrics


def check_speed_and_memory(failures: list[str], steps: int) -> None:
    gpu, metrics = seconds_per_step(DEVICE, steps)
    cpu, _ = seconds_per_step("cpu", max(3, steps // 10))
    predicted, measured = metrics["predicted_peak_bytes"], metrics["measured_peak_bytes"]
    ratio = predicted / measured
    print(f"MAML conv4-64, 16 tasks 5-way 1-shot 5-query, full, vmap: {gpu * 1e3:.1f} ms/meta-step on CUDA vs "
          f"{cpu * 1e3:.0f} ms on CPU ({torch.get_num_threads()} threads): {cpu / gpu:.0f}x")
    print(f"peak memory ({metrics['memory_method']}): predicted {format_bytes(predicted)}, measured "
          f"{format_bytes(measured)}, ratio {ratio:.2f} {'ok' if 0.7 < ratio < 1.5 else 'FAIL'}")
    if not 0.7 < ratio < 1.5:
        failures.append("memory prediction")


def check_budget(failures: list[str]) -> None:
    loop, meta, tasks = maml_problem(DEVICE)
    batch = task_to(tasks.sample(16, 20, torch.Generator().manual_seed(0)), DEVICE)
    plan = planning.plan(mo.Full(), loop, meta, batch, mo.Budget(), batching="loop", device=DEVICE)
    budget = mo.Budget(memory=plan.predicted_peak_bytes // 3)
    try:
        planning.plan(mo.Full(), loop, meta, batch, budget, batching="loop", device=DEVICE)
        print("budget: full under a third of its prediction was not refused FAIL")
        failures.append("budget refusal")
    except mo.BudgetExceeded as error:
        print(f"budget: refused before work: {str(error)[:160]}... ok")
    chosen = planning.choose(loop, meta, batch, budget, batching="loop", device=DEVICE)
    chosen.estimator(loop, meta, batch, batching=chosen.batching, chunk_size=chosen.chunk_size)  # warm-up
    with measure_peak_memory(DEVICE) as mem:
        chosen.estimator(loop, meta, batch, batching=chosen.batching, chunk_size=chosen.chunk_size)
    peak = mem.peak_bytes
    ok = peak <= budget.memory
    print(f"budget: auto chose {planning.describe(chosen.estimator)}; measured {format_bytes(peak)} for the batch "
          f"<= budget {format_bytes(budget.memory)} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append("auto under budget")


def check_device_sampling(failures: list[str]) -> None:
    """Omniglot gathered on the device (`Omniglot.to`) gives the CPU's tasks: equal with shifts (uint8 gather,
    exact conversion, index shifts), within 1e-5 with warps (bilinear resampling on other kernels)."""
    for name, options, atol in (("shifts", {"shift": 2}, 0.0),
                                ("warps", {"shift": 2, "warp_degrees": 10, "warp_shear": 0.3, "warp_scale": 0.2},
                                 1e-5)):
        tasks = generated_omniglot(n_way=20, k_shot=1, k_query=5, within_alphabet=True, drawer_split=True,
                                   **options)
        want = tasks.sample(8, 2, torch.Generator().manual_seed(0))
        got = tasks.to(DEVICE).sample(8, 2, torch.Generator().manual_seed(0))
        placed = got.query.x.device.type == torch.device(DEVICE).type
        worst = max(float((a.cpu() - b).abs().max()) for a, b in
                    ((got.query.x, want.query.x), (got.support[0].x, want.support[0].x)))
        same_labels = torch.equal(got.query.y.cpu(), want.query.y)
        ok = placed and same_labels and worst <= atol
        print(f"device sampling ({name}): tasks on {got.query.x.device}, largest difference from the CPU's "
              f"{worst:.1e} (allowed {atol:.0e}) {'ok' if ok else 'FAIL'}")
        if not ok:
            failures.append(f"device sampling ({name})")


def check_matmul_conv(failures: list[str]) -> None:
    """Second-order MAML over `Conv4(conv="matmul")` on CUDA equals native conv4's there and the CPU's (float64)."""
    torch.set_default_dtype(torch.float64)
    tasks = mo.RandomPatterns(n_way=5, k_shot=1, k_query=3).sample(4, 2, torch.Generator().manual_seed(0))
    grads = {}
    for device in ("cpu", DEVICE):
        for conv in ("native", "matmul"):
            torch.manual_seed(0)
            model = mo.Conv4(out_features=5, channels=16, conv=conv).to(device)
            loop = mo.InnerLoop(model, mo.optim.sgd(0.4), mo.losses.cross_entropy)
            meta = mo.meta_params(mo.Init(model))
            for batching in ("vmap", "stacked"):
                grads[device, conv, batching] = {k: g.cpu() for k, g in
                                                 mo.Full()(loop, meta, task_to(tasks, device), batching=batching)
                                                 .grads.items()}
    reference = grads["cpu", "native", "vmap"]
    worst = max(max(gradient_errors(g, reference).values()) for g in grads.values())
    _report(failures, "matmul convolution", worst <= 1e-9, f"MAML meta-gradients of native and matmul conv4, "
            f"vmapped and stacked, on CPU and {DEVICE}: largest relative difference {worst:.1e}")
    torch.set_default_dtype(torch.float32)


def _report(failures: list[str], check: str, ok: bool, message: str) -> None:
    """Print `check: message ok|FAIL`; a failed check joins `failures`."""
    print(f"{check}: {message} {'ok' if ok else 'FAIL'}")
    if not ok:
        failures.append(check)


def _trained_on_device(tasks: TaskDistribution, meta_steps: int, estimator: object = None, conv: str = "native",
                       **options: object) -> tuple[dict, dict]:
    """A seeded conv4-16 (`conv`: its convolution) trained with Adam on `tasks` on DEVICE by `estimator` (default
    `mo.Full()`; `options` to meta_train): its meta-parameters on the CPU and meta_train's metrics."""
    torch.manual_seed(0)
    model = mo.Conv4(out_features=5, channels=16, conv=conv).to(DEVICE)
    loop = mo.InnerLoop(model, mo.optim.sgd(0.4), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    metrics = mo.meta_train(loop, meta, estimator or mo.Full(), tasks,
                            outer_optimizer=torch.optim.Adam(meta.parameters(), 1e-3),
                            meta_steps=meta_steps, meta_batch_size=8, eval_n_tasks=0, progress=False, device=DEVICE,
                            **options)
    return {k: v.detach().cpu() for k, v in meta.state_dict().items()}, metrics


def check_prefetch(failures: list[str]) -> None:
    """meta_train on CUDA with and without prefetching: the same meta-parameters after a few steps (float64)."""
    torch.set_default_dtype(torch.float64)
    finals = [_trained_on_device(generated_omniglot(n_way=5, k_shot=1, k_query=5, shift=2), 6, prefetch=prefetch,
                                 overlap=False)[0] for prefetch in (False, True)]
    worst = max(gradient_errors(finals[1], finals[0]).values())
    _report(failures, "prefetch", worst <= 1e-9, f"meta-parameters after 6 steps with and without prefetching "
            f"on {DEVICE}, largest relative difference {worst:.1e}")
    torch.set_default_dtype(torch.float32)


def _poisoned(tasks: TaskDistribution, draws: tuple[int, ...]) -> TaskDistribution:
    """`tasks` whose draws number `draws` (1-based; draw 1 is the planner's) have task 1's query images NaN."""
    count, sample = [0], tasks.sample

    def poisoned(n_tasks: int, inner_steps: int, generator: torch.Generator) -> mo.Task:
        count[0] += 1
        task = sample(n_tasks, inner_steps, generator)
        if count[0] in draws:
            x = task.query.x.clone()
            x[1] = float("nan")
            task = task._replace(query=task.query._replace(x=x))
        return task
    tasks.sample = poisoned  # type: ignore[method-assign]
    return tasks


def check_overlap(failures: list[str]) -> None:
    """meta_train on CUDA overlapped and in turn, with non-finite tasks in draws 4 and 6 (steps 2 and 4, dropped):
    the same meta-parameters and the same dropped-task count (float64)."""
    torch.set_default_dtype(torch.float64)
    runs = [_trained_on_device(_poisoned(generated_omniglot(n_way=5, k_shot=1, k_query=5, shift=2).to(DEVICE), (4, 6)),
                               8, log_every=8, on_nan="skip", overlap=overlap) for overlap in (False, True)]
    worst = max(gradient_errors(runs[1][0], runs[0][0]).values())
    dropped = [metrics["tasks_nan_skipped"] for _, metrics in runs]
    _report(failures, "overlap", worst <= 1e-12 and dropped == [2, 2],
            f"meta-parameters after 8 steps overlapped and in turn on {DEVICE}, 2 of them with a NaN task "
            f"(dropped {dropped}): largest relative difference {worst:.1e}")
    torch.set_default_dtype(torch.float32)


def check_graphs_backend(failures: list[str]) -> None:
    """Compiled with backend="cudagraphs" equals eager (float64, conv4-16 with the matmul convolution, T=2, stacked
    chunks) over four calls with an in-place step of the meta-parameters before each; CUDA graphs' skips counted."""
    from torch._dynamo.utils import counters
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    model = mo.Conv4(out_features=5, channels=16, conv="matmul").to(DEVICE)
    loop = mo.InnerLoop(model, mo.optim.sgd(0.4), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    batch = task_to(mo.RandomPatterns(n_way=5, k_shot=1, k_query=5).sample(4, 2, torch.Generator().manual_seed(0)),
                    DEVICE)
    compiled, skips_before = Compiled(mo.Full(), backend="cudagraphs"), sum(counters["inductor"].values())
    worst, outputs = 0.0, []
    for _ in range(4):
        with torch.no_grad():
            for p in meta.parameters():
                p.mul_(0.99)
        got = compiled(loop, meta, batch)
        outputs.append(got.grads)
        worst = max(worst, max(gradient_errors(got.grads, mo.Full()(loop, meta, batch).grads).values()))
    distinct = all(a[k].data_ptr() != b[k].data_ptr() for a, b in zip(outputs, outputs[1:]) for k in a)
    skips = {k: v for k, v in counters["inductor"].items() if "cudagraph" in k}
    ok = compiled.fallback_reason is None and compiled.compiled_calls == 4 and worst <= 1e-9 and distinct
    _report(failures, "cudagraphs backend", ok, f"compiled with backend='cudagraphs' vs eager over 4 calls, "
            f"float64 matmul conv4-16, T=2: largest relative difference {worst:.1e}, outputs kept apart: {distinct}, "
            f"counters {skips or 'none'} (before: {skips_before}), fallback: {compiled.fallback_reason}")
    # A graph's memory pool outlives its call: is a whole step's measured peak still what the planner predicted?
    estimator = Compiled(mo.Full(), backend="cudagraphs")
    _, metrics = _trained_on_device(generated_omniglot(n_way=5, k_shot=1, k_query=5, shift=2), 8, estimator,
                                    conv="matmul", log_every=8)
    predicted, measured = metrics["predicted_peak_bytes"], metrics["measured_peak_bytes"]
    ratio = measured / predicted if predicted > 0 else float("nan")
    _report(failures, "cudagraphs backend memory", 0.7 < ratio < 1.5 or metrics["memory_method"] != "cuda",
            f"meta_train of matmul conv4-16 with it, 8 steps: peak ({metrics['memory_method']}) predicted "
            f"{format_bytes(predicted)}, measured {format_bytes(measured)} (ratio {ratio:.2f}; the step that "
            f"traced, apart: {format_bytes(metrics['compile_peak_bytes'])}), compiled {estimator.compiled}")
    torch.set_default_dtype(torch.float32)


CHECKS: dict[str, Callable[[list[str], int], None]] = {
    "sampling": lambda failures, steps: check_device_sampling(failures),
    "exactness": lambda failures, steps: check_exactness(failures),
    "compiled": lambda failures, steps: check_compiled_float64(failures),
    "speed": check_speed_and_memory,
    "budget": lambda failures, steps: check_budget(failures),
    "matmul": lambda failures, steps: check_matmul_conv(failures),
    "prefetch": lambda failures, steps: check_prefetch(failures),
    "overlap": lambda failures, steps: check_overlap(failures),
    "graphs": lambda failures, steps: check_graphs_backend(failures),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), default=list(CHECKS), help="checks to run")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a smoke run of this script
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("check_cuda: no CUDA device")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if DEVICE == 'cuda' else 'cpu'}")
    failures: list[str] = []
    start = time.perf_counter()
    for name in args.only:
        CHECKS[name](failures, args.steps)
    print(f"{len(failures)} failure(s) {failures}" if failures else "all checks passed",
          f"in {time.perf_counter() - start:.0f} s")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
