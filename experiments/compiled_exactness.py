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

Prints one line per implementation (`<name>: <weight>:<error> ...`; the eager ones also count the max-pool windows
whose gradient goes to another entry than in float64), the compiled function's first-call seconds
and median milliseconds per call (CUDA events over `--repeats` calls; perf_counter on the CPU), and as the last
line `worst_error compiled:<e> eager:<e> ms_per_call:<ms>` (eager: the worst of the three batchings).
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

import metaopt as mo
from bench_gpu import INNER_LR, problem, timer
from metaopt.compiled import Compiled, as_float64, gradient_errors, tasks_as_float64


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


def weight_errors(grads: dict[str, Tensor], reference: dict[str, Tensor]) -> dict[str, float]:
    """Each weight's error against `reference` (`gradient_errors` over all gradients, weights kept: a bias before
    batch normalization has a zero gradient, noise in every implementation)."""
    errors = gradient_errors({k: g.double() for k, g in grads.items()}, reference)
    return {k.removeprefix("init.params."): e for k, e in errors.items() if k.endswith("weight")}


BATCHINGS = ("stacked", "vmap", "loop")


class PoolRoutes(TorchDispatchMode):
    """Records, in order, the argmax indices of every max-pool run inside the block (`max_pool2d_with_indices`,
    below vmap: the batched call's)."""

    def __init__(self) -> None:
        super().__init__()
        self.indices: list[Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.max_pool2d_with_indices.default:
            self.indices.append(out[1].clone())
        return out


def eager_rows(loop: mo.InnerLoop, meta: mo.MetaParams, tasks: mo.Task) -> tuple[dict[str, Tensor], float]:
    """Eager float64 by every batching (the stacked one's gradients are the reference: they agree to rounding),
    then eager float32: prints each batching's weight errors against the reference and how many max-pool windows
    route their gradient unlike the same batching in float64 (a near-tie broken the other way by rounding).
    Returns (the reference, the worst float32 error)."""
    loop64, meta64 = as_float64(loop, meta)
    tasks64, runs64 = tasks_as_float64(tasks), {}
    for batching in BATCHINGS:
        with PoolRoutes() as routes64:
            runs64[batching] = mo.Full()(loop64, meta64, tasks64, batching=batching).grads, routes64.indices
    reference, worst = runs64["stacked"][0], 0.0
    for batching in BATCHINGS:
        with PoolRoutes() as routes:
            errors = weight_errors(mo.Full()(loop, meta, tasks, batching=batching).grads, reference)
        pairs = list(zip(routes.indices, runs64[batching][1]))
        flips = sum(int((a != b).sum()) for a, b in pairs)
        worst = max(worst, *errors.values())
        print(f"eager {batching}: " + " ".join(f"{k}:{e:.1e}" for k, e in errors.items())
              + f" | max-pool windows routed unlike float64: {flips} of {sum(a.numel() for a, _ in pairs)}",
              flush=True)
    return reference, worst


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
    model, tasks = problem(args.meta_batch, 1, args, args.conv)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=INNER_LR), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    print(f"device: {torch.cuda.get_device_name() if args.device.startswith('cuda') else 'CPU'}; torch "
          f"{torch.__version__}; conv4-{args.channels} conv={args.conv}, meta-batch {args.meta_batch}, T=1, "
          f"{args.dtype}, TF32 off; errors against eager float64", flush=True)

    reference, worst_eager = eager_rows(loop, meta, tasks)

    compiled = Compiled(mo.Full(), mode=args.mode, backend=args.backend, verify=False)
    began = time.perf_counter()
    grads = compiled(loop, meta, tasks).grads
    first = time.perf_counter() - began
    if compiled.fallback_reason is not None:
        raise SystemExit(f"compiled_exactness: nothing compiled: {compiled.fallback_reason}")
    errors = weight_errors(grads, reference)
    seconds = timer(args.device)
    ms = 1e3 * statistics.median(seconds(lambda: compiled(loop, meta, tasks)) for _ in range(args.repeats))
    label = f"compiled backend={args.backend} mode={args.mode} {parse_config(args.inductor) or ''}".rstrip()
    print(f"{label}: " + " ".join(f"{k}:{e:.1e}" for k, e in errors.items()), flush=True)
    print(f"compiled: first call {first:.1f} s, {ms:.2f} ms per call (median of {args.repeats})")
    print(f"worst_error compiled:{max(errors.values()):.1e} eager:{worst_eager:.1e} ms_per_call:{ms:.2f}")


if __name__ == "__main__":
    main()
