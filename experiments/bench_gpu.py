"""The GPU headline: one MAML meta-step of conv4 on Omniglot-shaped tasks, per implementation, and a whole
`meta_train` step against the bare meta-gradient.

    python experiments/bench_gpu.py                                 # CUDA: meta-batch 16 and 32, T = 1 and 5
    python experiments/bench_gpu.py --device cpu --meta-batch 2 --steps 1 --channels 8 --repeats 3   # a smoke run
    python experiments/bench_gpu.py --meta-batch 16 --steps 1 --conv native matmul --only metaopt \
        metaopt-cudagraph torch.func --profile --top-kernels 8       # the convolution's kernels compared

Tasks: 5-way 1-shot, 15 queries per class, 28x28 images, conv4 with 64 channels (CS330 HW2's MAML), one
inner SGD step of lr 0.4 per support batch, cross-entropy. The images are synthetic
(`mo.RandomPatterns`, Omniglot's shapes): the time of a step does not depend on the pixels, and no data
is needed on the GPU machine. Implementations, gradients checked equal (float32, 1e-3 relative to each
gradient's largest entry, floored at 1% of all gradients' largest; TF32 off unless --tf32):

  metaopt          `mo.get_estimator("full")`, eager
  metaopt-comp     the same compiled (`compile=True`: one torch.compile'd function per chunk)
  metaopt-cudagraph  compiled with mode="reduce-overhead" (Inductor's kernels in CUDA graphs; CUDA only)
  metaopt-aotgraph   compiled with backend="cudagraphs" (the traced graph on eager's kernels, replayed as CUDA
                   graphs: no code generation; on the CPU the graph runs without them)
  torch.func       hand-written torch.func.grad + vmap inner loop, autograd outer gradient
  torch.func-comp  the hand-written meta-gradient under torch.compile(fullgraph=True)
  higher           higher 0.2.1, task by task (when installed)
  torchopt         TorchOpt's MAML recipe (`torchopt.MetaSGD`), task by task (when installed)

`--conv native matmul` runs each metaopt implementation over both convolutions of `Conv4(conv=...)`:
`native` (nn.Conv2d; per-task weights become one grouped cuDNN convolution) and `matmul` (`MatmulConv2d`,
im2col and one batched GEMM), named e.g. `metaopt-cudagraph[matmul]`; the hand-written ones use native.
`--only` keeps the named implementations (a base name for every convolution, `name[conv]` for one, e.g.
`metaopt-cudagraph[native]`; each compiled one costs a minute or more of compilation on a GPU).

Times are medians over interleaved rounds in a shuffled order, measured with CUDA events on CUDA
(perf_counter on CPU). Then `meta_train` runs `--train-steps` meta-steps on freshly sampled tasks
(sampling, finiteness check, Adam step) with the eager estimator, drawing each batch between steps and
ahead on a worker thread (`meta_train(prefetch=...)`), each step in turn and one step ahead of the device
(`meta_train(overlap=...)`, `metaopt.overlap`), and with the compiled one, prefetching, in turn and ahead (the
fastest compiled metaopt implementation of the table: its convolution and mode); its median
`seconds_per_meta_step` is compared with the same implementation's bare meta-gradient.
`--train-tasks omniglot` (default): Omniglot's sampler over generated images, gathered on the device;
`patterns`: RandomPatterns, generated on the host and copied (what README's first GPU figures used).
Sampling one meta-batch alone is timed too. `--profile-train` then profiles that compiled whole step
(`profile_train_step`: the device's busy and idle time per step, the host's heaviest ops).

The device and torch version are printed first; the last line is `ms_per_step_T<T>_B<B>` and then
`<implementation>:<ms>` for every implementation timed at the first (B, T), `fell_back:<names>` where a compiled
one ran eager (its reason printed at its first call), and `train_vs_bare:<x>` (the whole step, prefetching and
overlapped, over its bare meta-gradient: the fastest compiled metaopt implementation, or the fastest eager one
where none compiled) where the whole step ran, `train_failed:<name>` where it raised (its error
printed in its row; the other rows still run).
"""
from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any, Callable, Sequence

import torch

import metaopt as mo
from bench_step import make_metaopt, make_torch_func, make_torch_func_compiled, task_by_task_references
from metaopt.callbacks import Callback
from metaopt.compiled import Compiled, gradient_errors
from metaopt.tasks import TaskDistribution
from metaopt.tasks.omniglot import Omniglot, OmniglotImages
from metaopt.train import task_to

N_WAY, K_SHOT, K_QUERY, SIZE, INNER_LR = 5, 1, 15, 28, 0.4


def timer(device: str) -> Callable[[Callable[[], object]], float]:
    """fn -> seconds of one call: CUDA events around it on CUDA (synchronized), perf_counter on CPU."""
    if device.startswith("cuda"):
        def cuda_seconds(fn: Callable[[], object]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        return cuda_seconds

    def cpu_seconds(fn: Callable[[], object]) -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return cpu_seconds


METAOPT_MODES: dict[str, tuple[str | None, str] | None] = {
    "metaopt": None, "metaopt-comp": (None, "inductor"), "metaopt-cudagraph": ("reduce-overhead", "inductor"),
    "metaopt-aotgraph": (None, "cudagraphs")}
"""metaopt's implementations: None (eager) or `Compiled`'s (mode, backend)."""
GRAPHS_ONLY = ("metaopt-cudagraph",)
"""Timed on CUDA only (Inductor's compile for nothing: no CUDA graphs on the CPU); metaopt-aotgraph runs there as
"aot_eager" (torch skips the graphs), no code generation: the CPU smoke run covers its rows."""


def metaopt_estimator(name: str) -> Any:
    """The estimator of metaopt's implementation `name` (a key of METAOPT_MODES): "full", eager or `Compiled`."""
    compiled = METAOPT_MODES[name]
    return mo.get_estimator("full") if compiled is None else \
        Compiled(mo.get_estimator("full"), mode=compiled[0], backend=compiled[1])


def implementations(meta_batch: int, steps: int, args: argparse.Namespace) -> dict[str, Callable[[], list]]:
    """Each implementation's meta-step (a function returning the gradients) over the same seeded weights and tasks:
    metaopt's per convolution of `args.conv`, the hand-written ones over the native convolution; `args.only`
    keeps some: a base name ("metaopt-cudagraph") for every convolution, "name[conv]" for one."""
    loss, cuda = mo.losses.cross_entropy, args.device.startswith("cuda")
    wanted = (lambda name, conv="native": args.only is None or name in args.only or f"{name}[{conv}]" in args.only)
    impls: dict[str, Callable[[], list]] = {}
    for conv in args.conv:
        model, tasks = problem(meta_batch, steps, args, conv)
        suffix = "" if conv == "native" else f"[{conv}]"
        for name, compiled in METAOPT_MODES.items():
            if wanted(name, conv) and (cuda or name not in GRAPHS_ONLY):
                mode, backend = compiled or (None, "inductor")
                impls[name + suffix] = make_metaopt(model, tasks, "auto", compile=compiled is not None, loss=loss,
                                                    lr=INNER_LR, mode=mode, backend=backend)
    model, tasks = problem(meta_batch, steps, args, "native")
    impls["torch.func"] = make_torch_func(model, tasks, loss=loss, lr=INNER_LR)  # the reference: always
    if wanted("torch.func-comp"):
        impls["torch.func-comp"] = make_torch_func_compiled(model, tasks, loss=loss, lr=INNER_LR)
    references = task_by_task_references(model, tasks, loss=loss, lr=INNER_LR)  # higher, torchopt: where installed
    impls.update({name: step for name, step in references.items() if wanted(name)})
    return impls


def problem(meta_batch: int, steps: int, args: argparse.Namespace,
            conv: str = "native") -> tuple[torch.nn.Module, mo.Task]:
    """The seeded conv4 model (the same weights for either convolution) and one batch of tasks on the device."""
    torch.manual_seed(0)
    model = mo.Conv4(1, N_WAY, channels=args.channels, image_size=SIZE, conv=conv).to(args.device)
    sampler = mo.RandomPatterns(n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY, size=SIZE)
    return model, task_to(sampler.sample(meta_batch, steps, torch.Generator().manual_seed(0)), args.device)


def bench(meta_batch: int, steps: int, args: argparse.Namespace, mismatches: list[str],
          fallbacks: set[str]) -> dict[str, float]:
    """Median seconds per meta-step of each implementation at this meta-batch and unroll length (and, with
    `--profile`, each one's profile table). Gradients that differ from torch.func's join `mismatches`; compiled
    implementations that fell back to eager (`Compiled.fallback_reason`) join `fallbacks`."""
    impls = implementations(meta_batch, steps, args)
    reference = {str(i): g for i, g in enumerate(impls["torch.func"]())}
    for name, fn in impls.items():  # same gradient; warm-up (the compiled ones compile here)
        start = time.perf_counter()
        error = max(gradient_errors({str(i): g for i, g in enumerate(fn())}, reference).values())
        print(f"  B={meta_batch} T={steps}: {name} first call {time.perf_counter() - start:.1f} s, "
              f"relative error {error:.1e}", flush=True)
        if not error <= (1e-2 if args.tf32 else 1e-3):  # reported at the end: the timings still come
            mismatches.append(f"B={meta_batch} T={steps} {name}: {error:.1e}")
        reason = getattr(getattr(fn, "estimator", None), "fallback_reason", None)
        if reason is not None:  # its row times eager code: said in the table and the last line
            print(f"  B={meta_batch} T={steps}: {name} RUNS EAGER: {reason}", flush=True)
            fallbacks.add(name)
    seconds = timer(args.device)
    times: dict[str, list[float]] = {name: [] for name in impls}
    order, shuffler = list(impls), random.Random(steps * 1000 + meta_batch)
    for _ in range(args.repeats):
        shuffler.shuffle(order)
        for name in order:
            times[name].append(seconds(impls[name]))
    if args.profile:
        print_profile(impls, meta_batch, steps, args.device, args.top_kernels)
    return {name: statistics.median(t) for name, t in times.items()}


def training_tasks(kind: str) -> TaskDistribution:
    """The tasks of the whole-step comparison. "omniglot": `Omniglot` over generated images (random strokes for
    Omniglot's background counts, 964 characters x 20 drawers in 30 alphabets, with rotations), sampled as real
    Omniglot is: a gather from one uint8 tensor that `meta_train` keeps on the device (`Omniglot.to`).
    "patterns": `RandomPatterns`, generated on the host for every batch (noise for every image) and copied."""
    if kind == "patterns":
        return mo.RandomPatterns(n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY, size=SIZE)
    return generated_omniglot(n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY)


def generated_omniglot(characters: int = 964, alphabets: int = 30, **options: object) -> Omniglot:
    """`Omniglot` over generated images: random strokes (15% of pixels lit) for `characters` characters x 20
    drawers in `alphabets` alphabets (default: the background set's counts), every character training (with
    rotations); `options` go to `Omniglot` (n_way, shift, ...). No data on disk needed."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand((characters, 20, SIZE, SIZE), generator=generator) < 0.15).to(torch.uint8) * 255
    names = [f"alphabet{i % alphabets:02d}" for i in range(characters)]
    data = OmniglotImages(images, names, [f"{a}/character{i:03d}" for i, a in enumerate(names)],
                          ["background"] * characters)
    return Omniglot(data, size=SIZE, split_by="character", val_fraction=0.0, test_fraction=0.0, **options)


def sampling_seconds(tasks: TaskDistribution, meta_batch: int, args: argparse.Namespace) -> float:
    """Median seconds to draw one meta-batch of `tasks` and have it on the device (synchronized), alone."""
    tasks, generator, times = tasks.to(args.device), torch.Generator().manual_seed(1), []
    for _ in range(max(args.repeats, 5)):
        start = time.perf_counter()
        batch = task_to(tasks.sample(meta_batch, 1, generator), args.device)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize(args.device)
        times.append(time.perf_counter() - start)
    del batch
    return statistics.median(times)


def train_step_seconds(meta_batch: int, steps: int, implementation: str, args: argparse.Namespace,
                       prefetch: bool | None = None, meta_steps: int | None = None,
                       callbacks: Sequence[Callback] = (), overlap: bool | None = None) -> float:
    """Median seconds of a whole meta_train step (sampling, copy, meta-gradient, checks, Adam) with a metaopt
    implementation of the table ("metaopt-cudagraph[matmul]": its mode and convolution); `prefetch` and `overlap`
    as `meta_train`'s (None: on CUDA); `meta_steps` (default `--train-steps`) and `callbacks` to `meta_train`."""
    meta_steps = meta_steps or args.train_steps
    name, _, conv = implementation.partition("[")
    torch.manual_seed(0)
    model = mo.Conv4(1, N_WAY, channels=args.channels, image_size=SIZE, conv=conv.rstrip("]") or "native")
    loop = mo.InnerLoop(model.to(args.device), mo.optim.sgd(lr=INNER_LR), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    metrics = mo.meta_train(loop, meta, metaopt_estimator(name), training_tasks(args.train_tasks),
                            outer_optimizer=torch.optim.Adam(meta.parameters(), lr=1e-3),
                            meta_steps=meta_steps, meta_batch_size=meta_batch, inner_steps=steps,
                            eval_n_tasks=0, progress=False, log_every=meta_steps,
                            device=args.device, prefetch=prefetch, callbacks=callbacks, overlap=overlap)
    return float(metrics["seconds_per_meta_step"])


class ProfilerSteps(Callback):
    """Advances a `torch.profiler` schedule once per meta-step but the last, asking for no history entry:
    `meta_train` asks every callback's `due` once for each meta-step that is neither a logging step nor the last
    (an overlapped loop asks before the step runs, the synchronous one after), so with `log_every` = `meta_steps`
    (as `train_step_seconds` runs it) that is every step but the last."""

    def __init__(self, profiler: Any):
        self.profiler = profiler

    def due(self, step: int) -> bool:
        self.profiler.step()
        return False


def profile_train_step(meta_batch: int, steps: int, implementation: str, args: argparse.Namespace,
                       active: int = 8, top: int = 8) -> None:
    """Where a whole meta_train step's time goes beyond its meta-gradient: `active` prefetched steps of
    `implementation` under torch.profiler (after 3 steps for its first call and the memory-measured steps, and 2
    of warm-up), printed as wall milliseconds per step, the device's busy milliseconds per step (the union of
    its kernels' intervals: wall minus busy is the time the GPU waited for the host) and kernels per step, then
    the `top` host ops by self time per step (every thread: the prefetching worker's too). The profiler slows
    the host: compare busy and idle within this line, not with the timed rows."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, schedule

    cuda = args.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, schedule=schedule(wait=3, warmup=2, active=active, repeat=1)) as prof:
        train_step_seconds(meta_batch, steps, implementation, args, prefetch=True, overlap=True,
                           meta_steps=3 + 2 + active + 1, callbacks=[ProfilerSteps(prof)])
    events = prof.events()
    marks = [e.time_range for e in events if e.name.startswith("ProfilerStep")]
    if not marks:
        print(f"whole-step profile ({implementation}): no profiled steps", flush=True)
        return
    begin, end = min(m.start for m in marks), max(m.end for m in marks)
    kernels = sorted((max(e.time_range.start, begin), min(e.time_range.end, end)) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > begin and e.time_range.start < end)
    busy, reach = 0.0, begin
    for start, stop in kernels:  # the union of the kernels' intervals, in microseconds
        busy += max(0.0, stop - max(start, reach))
        reach = max(reach, stop)
    wall = (end - begin) / len(marks)
    host = sorted((a for a in prof.key_averages() if not a.key.startswith("ProfilerStep")),
                  key=lambda a: -a.self_cpu_time_total)[:top]
    print(f"whole-step profile (B={meta_batch}, T={steps}, {implementation}, prefetch True, overlap True, "
          f"{len(marks)} steps): "
          f"wall {wall / 1e3:.2f} ms per step, device busy {busy / len(marks) / 1e3:.2f} ms, idle "
          f"{(wall - busy / len(marks)) / 1e3:.2f} ms, {len(kernels) / len(marks):.0f} kernels per step; "
          "host ops by self time per step: " + "; ".join(
              f"{a.key[:50]} x{a.count / len(marks):.0f} {a.self_cpu_time_total / len(marks) / 1e3:.2f} ms"
              for a in host), flush=True)


def profile_counts(fn: Callable[[], object], device: str,
                   top: int = 0) -> tuple[int, int, float, list[tuple[str, int, float]]]:
    """One call of fn under torch.profiler: (aten ops dispatched on the host, device kernels launched, total
    kernel time in seconds, and the `top` kernels by their summed time: (name, launches, seconds)). Kernel time
    far below the step's time means the step is launch- or host-bound."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    events = prof.events()
    ops = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time / 1e6)
    heaviest = sorted(((name, len(t), sum(t)) for name, t in by_name.items()), key=lambda k: -k[2])[:top]
    return ops, len(kernels), sum(e.device_time for e in kernels) / 1e6, heaviest


def print_profile(impls: dict[str, Callable[[], list]], meta_batch: int, steps: int, device: str,
                  top: int = 0) -> None:
    """The profile table of each (already compiled and warm) implementation at one configuration, and with
    `top` > 0 each one's heaviest kernels."""
    print(f"profile (B={meta_batch}, T={steps}; one meta-step):")
    print("| implementation | aten ops on the host | device kernels | kernel time ms |")
    print("|---|---|---|---|")
    heaviest = {}
    for name, fn in impls.items():
        ops, kernels, kernel_seconds, heaviest[name] = profile_counts(fn, device, top)
        print(f"| {name} | {ops} | {kernels} | {1e3 * kernel_seconds:.2f} |", flush=True)
    for name, rows in heaviest.items():
        if rows:
            print(f"heaviest kernels of {name}: " + "; ".join(
                f"{kernel[:70]} x{launches} {1e3 * seconds:.2f} ms" for kernel, launches, seconds in rows), flush=True)


def cudnn_benchmark_ab(meta_batch: int, steps: int, args: argparse.Namespace) -> None:
    """metaopt eager with `cudnn.benchmark` off and on, toggled per call, interleaved in a shuffled order."""
    model, tasks = problem(meta_batch, steps, args, args.conv[0])
    step, seconds = make_metaopt(model, tasks, "auto", loss=mo.losses.cross_entropy, lr=INNER_LR), timer(args.device)
    times: dict[bool, list[float]] = {False: [], True: []}
    order, shuffler = [False, True], random.Random(0)
    for flag in order:  # warm-up: benchmark mode times its algorithms on the first call per shape
        torch.backends.cudnn.benchmark = flag
        step()
    for _ in range(args.repeats):
        shuffler.shuffle(order)
        for flag in order:
            torch.backends.cudnn.benchmark = flag
            times[flag].append(seconds(step))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"cudnn.benchmark A/B (metaopt eager, B={meta_batch}, T={steps}): off {1e3 * off:.2f} ms, "
          f"on {1e3 * on:.2f} ms, {off / on:.2f}x")


def set_inductor_config(pairs: Sequence[str]) -> None:
    """`KEY=VALUE` pairs into `torch._inductor.config` (VALUE a Python literal); an unknown key is an error."""
    import ast

    from torch._inductor import config
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not hasattr(config, key):
            raise SystemExit(f"bench_gpu: --inductor-config {pair!r}: need KEY=VALUE, KEY in torch._inductor.config")
        setattr(config, key, ast.literal_eval(value))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--meta-batch", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--conv", nargs="+", choices=["native", "matmul"], default=["native"],
                        help="Conv4's convolution(s) for metaopt's implementations (see above)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="implementations to time (base names: metaopt, metaopt-comp, metaopt-cudagraph, "
                             "metaopt-aotgraph, torch.func-comp, higher, torchopt; metaopt's for every --conv, or one: "
                             "metaopt-cudagraph[native]); torch.func, the reference, always runs")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=60, help="0: skip the whole-meta_train comparison")
    parser.add_argument("--train-tasks", choices=["omniglot", "patterns"], default="omniglot",
                        help="tasks of the whole-step comparison (see training_tasks)")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 convolutions and matmuls (CUDA; "
                        "default off: float32 throughout, so the gradients compare at 1e-3)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms per shape")
    parser.add_argument("--cudnn-ab", action="store_true",
                        help="only time metaopt eager with cudnn.benchmark off vs on, interleaved")
    parser.add_argument("--profile", action="store_true",
                        help="also profile one step of each (ops, kernels) per configuration")
    parser.add_argument("--top-kernels", type=int, default=0, help="with --profile: list each one's N heaviest kernels")
    parser.add_argument("--profile-train", action="store_true",
                        help="also profile the whole meta_train step of the fastest implementation: the device's "
                             "busy and idle time per step and the host's heaviest ops")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--inductor-config", nargs="+", default=[], metavar="KEY=VALUE",
                        help="set torch._inductor.config entries for every compiled row (e.g. "
                             "force_layout_optimization=True: channels-last convolutions, which Inductor's "
                             "heuristics skip for grouped ones)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    set_inductor_config(args.inductor_config)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_gpu: --device cuda but CUDA is not available (use --device cpu for a smoke run)")
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(args.device) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; conv4-{args.channels}, {N_WAY}-way {K_SHOT}-shot "
          f"{K_QUERY} queries/class, {args.repeats} interleaved rounds, TF32 {'on' if args.tf32 else 'off'}, "
          f"cudnn.benchmark {args.cudnn_benchmark}" + "".join(f", inductor {kv}" for kv in args.inductor_config))
    if args.cudnn_ab:
        for meta_batch in args.meta_batch:
            for steps in args.steps:
                cudnn_benchmark_ab(meta_batch, steps, args)
        return
    print("| meta-batch | T | " + " | ".join(["implementation", "ms per meta-step", "vs hand-written eager"]) + " |")
    print("|---|---|---|---|---|")
    headline: dict[str, float] = {}
    mismatches: list[str] = []
    fallbacks: set[str] = set()
    for meta_batch in args.meta_batch:
        for steps in args.steps:
            medians = bench(meta_batch, steps, args, mismatches, fallbacks)
            for impl, s in medians.items():
                shown = impl + (" (fell back to eager)" if impl in fallbacks else "")
                print(f"| {meta_batch} | {steps} | {shown} | {1e3 * s:.2f} | {medians['torch.func'] / s:.2f}x |",
                      flush=True)
            if (meta_batch, steps) == (args.meta_batch[0], args.steps[0]):
                headline = medians
    b, t = args.meta_batch[0], args.steps[0]
    if mismatches:
        raise SystemExit("bench_gpu: gradients differ from torch.func's (relative error): " + "; ".join(mismatches))
    fields = " ".join(f"{name}:{1e3 * seconds:.2f}" for name, seconds in headline.items())
    if fallbacks:
        fields += f" fell_back:{','.join(sorted(fallbacks))}"
    ours = {name: s for name, s in headline.items()  # metaopt's rows that ran as named
            if name.partition("[")[0] in METAOPT_MODES and name not in fallbacks}
    compiled = {name: s for name, s in ours.items() if METAOPT_MODES[name.partition("[")[0]]}
    if args.train_steps <= 0 or not ours:
        print(f"ms_per_step_T{t}_B{b} {fields}")
        return
    sampled = sampling_seconds(training_tasks(args.train_tasks), b, args)
    print(f"sampling {b} {args.train_tasks} tasks onto {args.device}, alone: {1e3 * sampled:.2f} ms", flush=True)
    fastest = min(compiled or ours, key=lambda name: (compiled or ours)[name])  # compiled where one ran
    eager = "metaopt" + fastest.partition("[")[1] + fastest.partition("[")[2]
    train: dict[tuple[str, bool, bool], float] = {}
    for implementation, prefetch, overlap in ((eager, False, False), (eager, True, False), (eager, True, True),
                                              (fastest, True, False), (fastest, True, True)):
        if (implementation, prefetch, overlap) in train:
            continue
        row = f"whole meta_train step (B={b}, T={t}), prefetch {prefetch}, overlap {overlap}: {implementation}"
        try:
            seconds = train_step_seconds(b, t, implementation, args, prefetch, overlap=overlap)
        except Exception as error:  # noqa: BLE001 (a device run is one try: the other rows and the last line stay)
            print(f"{row} FAILED: {type(error).__name__}: {error}", flush=True)
            continue
        train[implementation, prefetch, overlap] = seconds
        ratio = f" ({seconds / headline[implementation]:.2f}x the bare meta-gradient)" if implementation in headline \
            else ""
        print(f"{row} {1e3 * seconds:.2f} ms" + ratio, flush=True)
    if args.profile_train:
        try:
            profile_train_step(b, t, fastest, args)
        except Exception as error:  # noqa: BLE001 (a device run is one try: the last line stays)
            print(f"whole-step profile: {fastest} FAILED: {type(error).__name__}: {error}", flush=True)
    whole = f" train_vs_bare:{train[fastest, True, True] / headline[fastest]:.2f}" if (fastest, True, True) in train \
        else f" train_failed:{fastest}"
    print(f"ms_per_step_T{t}_B{b} {fields}{whole}")


if __name__ == "__main__":
    main()
