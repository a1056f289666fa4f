"""Is the compiled meta-gradient exact on this device? Each weight's error, compiled and eager, against eager float64.

    python experiments/compiled_exactness.py --conv matmul --mode reduce-overhead          # CUDA: the H200 finding
    python experiments/compiled_exactness.py --conv matmul --dtype float64                 # a wrong program, or rounding?
    python experiments/compiled_exactness.py --conv matmul --backend aot_eager_decomp_partition   # whose fault?
    python experiments/compiled_exactness.py --device cpu --meta-batch 2 --channels 8 --backend aot_eager  # smoke

`bench_gpu.py`'s problem (MAML conv4, 5-way 1-shot, 15 queries per class, 28x28 `RandomPatterns`, one inner SGD
step of lr 0.4, cross-entropy, seeded weights and tasks) at `--meta-batch` and `--channels`: the meta-gradient
of `mo.Full()` compiled (`metaopt.compiled.Compiled` with `--backend`, `--mode`, `--inductor KEY=VALUE` config;
`verify=False`, so the compiled result is what is measured, never the eager fallback) and eager, batched by
`stacked`, `vmap` and `loop`, each compared with eager float64 (`gradient_errors`: the largest difference
relative to the gradient's largest entry, floored at 1% of all gradients' largest).

Reading it: in float32, eager implementations differ from float64 by rounding, amplified where a max-pool's
gradient follows a near-tie that rounding breaks the other way (1e-5 to 1e-3); a compiled error far above that
is a wrong program when `--dtype float64` is far off too (float64 has no such ties at float32's scale). Then
`--backend aot_eager` (the traced graphs run eagerly) and `aot_eager_decomp_partition` (plus Inductor's
decompositions and partitioner) say whether tracing or Inductor's code generation is at fault.

Prints one line per implementation (`<name>: <weight>:<error> ...`), the compiled function's first-call seconds
and median milliseconds per call (CUDA events over `--repeats` calls; perf_counter on the CPU), and as the last
line `worst_error compiled:<e> eager:<e> ms_per_call:<ms>` (eager: the worst of the three batchings).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

import metaopt as mo
from metaopt.compiled import Compiled, as_float64, gradient_errors
from metaopt.train import task_to

N_WAY, K_SHOT, K_QUERY, SIZE, INNER_LR = 5, 1, 15, 28, 0.4


def parse_config(pairs: list[str]) -> dict[str, Any]:
    """["triton.cudagraphs=False", "split_reductions=0"] -> {"triton.cudagraphs": False, ...}: "True"/"False" as
    booleans, integers as ints, anything else as the string."""
    config: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"compiled_exactness: --inductor {pair!r}: expected KEY=VALUE")
        config[key] = {"True": True, "False": False}.get(value, int(value) if value.lstrip("-").isdigit() else value)
    return config


def milliseconds(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median milliseconds per call of `fn` (CUDA events on CUDA, perf_counter elsewhere)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - began))
    return statistics.median(times)


def weight_errors(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Each weight's error against `reference` (`gradient_errors` over all gradients, weights kept: a bias before
    batch normalization has a zero gradient, noise in every implementation)."""
    errors = gradient_errors({k: g.double() for k, g in grads.items()}, reference)
    return {k.removeprefix("init.params."): e for k, e in errors.items() if k.endswith("weight")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--conv", choices=["native", "matmul"], default="matmul")
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager, ...)")
    parser.add_argument("--mode", default=None, help="torch.compile mode (Inductor only; reduce-overhead: CUDA graphs)")
    parser.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config entries set before compiling")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls of the compiled function")
    args = parser.parse_args()

    import torch._inductor.config as inductor_config
    for key, value in parse_config(args.inductor).items():
        target, *path = [inductor_config, *key.split(".")]
        for name in path[:-1]:
            target = getattr(target, name)
        setattr(target, path[-1], value)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.manual_seed(0)
    model = mo.Conv4(1, N_WAY, channels=args.channels, image_size=SIZE, conv=args.conv).to(args.device)
    sampler = mo.RandomPatterns(n_way=N_WAY, k_shot=K_SHOT, k_query=K_QUERY, size=SIZE)
    tasks = task_to(sampler.sample(args.meta_batch, 1, torch.Generator().manual_seed(0)), args.device)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=INNER_LR), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    loop64, meta64 = as_float64(loop, meta)
    tasks64 = tree_map_only(Tensor, lambda v: v.double() if v.is_floating_point() else v, tasks)
    reference = mo.Full()(loop64, meta64, tasks64).grads
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}; torch "
          f"{torch.__version__}; conv4-{args.channels} conv={args.conv}, meta-batch {args.meta_batch}, T=1, "
          f"{args.dtype}, TF32 off; errors against eager float64", flush=True)

    worst_eager = 0.0
    for batching in ("stacked", "vmap", "loop"):
        errors = weight_errors(mo.Full()(loop, meta, tasks, batching=batching).grads, reference)
        worst_eager = max(worst_eager, *errors.values())
        print(f"eager {batching}: " + " ".join(f"{k}:{e:.1e}" for k, e in errors.items()), flush=True)

    compiled = Compiled(mo.Full(), mode=args.mode, backend=args.backend, verify=False)
    began = time.perf_counter()
    grads = compiled(loop, meta, tasks).grads
    first = time.perf_counter() - began
    if compiled.fallback_reason is not None:
        raise SystemExit(f"compiled_exactness: nothing compiled: {compiled.fallback_reason}")
    errors = weight_errors(grads, reference)
    ms = milliseconds(lambda: compiled(loop, meta, tasks), args.device, args.repeats)
    label = f"compiled backend={args.backend} mode={args.mode} {parse_config(args.inductor) or ''}".rstrip()
    print(f"{label}: " + " ".join(f"{k}:{e:.1e}" for k, e in errors.items()), flush=True)
    print(f"compiled: first call {first:.1f} s, {ms:.2f} ms per call (median of {args.repeats})")
    print(f"worst_error compiled:{max(errors.values()):.1e} eager:{worst_eager:.1e} ms_per_call:{ms:.2f}")


if __name__ == "__main__":
    main()
