"""The compiled path: a vmapped chunk's whole meta-gradient as one `torch.compile`d function.

Eager metaopt pays per op: ~50 dispatched ops per inner step and 120-150 backward nodes,
each through the functorch layers and Python, for a few MFLOP of arithmetic (sinusoid
MAML). `Compiled(estimator)` traces, once per input shape, the function

    tasks -> torch.func.grad(mean over the chunk's tasks of the estimator's surrogate)(meta's values)

(the outer gradient of the vmapped tasks' outer losses, inner unroll and inner gradients
included) with `torch.compile(fullgraph=True)`, so the whole meta-gradient runs as one
generated kernel program. Everything else (chunks, the budget, retries, counting) is the
runner's, unchanged.

Exactness first: torch.compile has had silent-correctness bugs around higher-order
autodiff, so the first call at every new input shape is checked against the eager
estimator (float64: 1e-9, float32: `FLOAT32_RTOL` by device; `gradient_errors`; a float32
mismatch is refereed by eager float64: compiled stands if it is as close to float64 as eager float32). A
compile error, a graph break (`fullgraph`), or a mismatch switches the wrapper to eager
for good, with `fallback_reason` saying why (logged once; never silently wrong).

What does not compile (eager instead, said in `fallback_reason` when nothing compiled):
task-by-task batching (`batching="loop"`, or a loop whose layers cannot vmap); the budget
guard's checks inside the unroll (under compile it checks after each chunk only). Compile
time is paid once per shape (`compile_seconds`).
"""
from __future__ import annotations

import copy
import logging
import os
import sys
import sysconfig
import time
import types
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_map_only

from metaopt.batching import Batching, expand_support, vmap_tasks
from metaopt.budget import Budget
from metaopt.loop import InnerLoop
from metaopt.metacall import MetaCall, meta_values
from metaopt.runner import Differentiator, MetaGrad, grads_of, run_meta_gradient
from metaopt.stacked import StackedLoop
from metaopt.types import MetaParams, Task

__all__ = ["Compiled", "ChunkResult", "default_options", "library_guard_filter", "with_own_code", "gradient_errors",
           "as_float64", "tasks_as_float64", "FLOAT32_RTOL", "REFEREE_FACTOR"]

log = logging.getLogger("metaopt")

ChunkResult = tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor, Tensor]
"""A chunk's (gradients, the mean over its tasks; outer losses [B]; stats {name: [B]}; the mean outer loss, a
scalar; which tasks were used, bool [B], all True), no graph left. The last two come out of the compiled graph:
after the call, each op costs 5-12 us on caches the kernels left cold, several times its usual cost."""


def _objective_of(estimator: Differentiator, loop: InnerLoop,
                  meta: MetaParams) -> Callable[[Task], tuple[Tensor, Tensor, dict[str, Tensor]]]:
    """One task's (surrogate, outer loss, stats): what the compiled function maps over tasks. The carry is left
    out: vmap returns no None, and estimators that carry state (online PES) do not compile."""
    def objective(task: Task) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        result = estimator.task_objective(loop, meta, task, None)
        return result.surrogate, result.outer_loss, dict(result.stats)
    return objective


def _signature(tasks: Task, pattern: tuple[int, ...]) -> tuple:
    """What a new compilation depends on, cheaply (per call): the shapes and strides of the inputs (Dynamo
    specializes on both: a query sliced from a larger sample and the same query made contiguous compile
    separately), their dtype and device, and the support pattern (the meta-parameters' shapes are fixed for a
    wrapper's (loop, meta)). A recompilation this missed would not be checked against eager, and the budget
    guard would count its compile time as the step's."""
    x, y = tasks.query
    return (x.shape, x.stride(), y.shape, y.stride(), x.dtype, x.device.type,
            tuple((b.x.shape, b.x.stride(), b.y.shape, b.y.stride()) for b in tasks.support),
            tasks.init is not None, pattern)


#: Tolerance of the first-call check in float32, by device type (float64: 1e-9 everywhere). On CUDA the compiled
#: graph's convolutions run other cuDNN/Triton kernels than eager's: on an H100 (torch 2.11, TF32 off) the compiled
#: and eager float32 meta-gradients of MAML conv4-64 differed by 1.8e-4 at meta-batch 16 and 2.4e-3 at 32, about
#: as much as a hand-written torch.func version compiled differs from itself eager (`experiments/bench_gpu.py`),
#: while float64 agrees to 4e-14 (`experiments/check_cuda.py`). CPU kernels agree to 1e-4.
FLOAT32_RTOL: dict[str, float] = {"cpu": 1e-4, "cuda": 1e-2}

#: A float32 compiled gradient that fails the check stands if eager float64 finds it at most this many times as
#: far from float64 as eager float32 is (`Compiled._refereed`): kernels round differently, not 10x worse.
REFEREE_FACTOR = 10.0


def as_float64(loop: InnerLoop, meta: MetaParams) -> tuple[InnerLoop, MetaParams]:
    """Copies of `loop` and `meta` in float64 (one deep copy, so the modules they share stay shared): every
    module held by the loop or by meta is converted; the originals are untouched."""
    loop64, meta64 = copy.deepcopy((loop, meta))
    for held in [meta64, *vars(loop64).values()]:
        if isinstance(held, torch.nn.Module):
            held.double()
    return loop64, meta64


def tasks_as_float64(tasks: Task) -> Task:
    """`tasks` with every floating tensor in float64 (labels and other integer tensors as they are)."""
    return tree_map_only(Tensor, lambda v: v.double() if v.is_floating_point() else v, tasks)


def gradient_errors(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, float]:
    """Each of `want`'s gradients' largest |difference| from `got`'s, relative to its largest |entry| but never
    to less than 1% of the largest entry of all gradients: a gradient that is zero up to rounding (a conv bias
    under batch normalization) is noise in both, and noise differs. NaN where either is NaN. One host sync per
    gradient: for checks, not for a training step."""
    largest = max((float(w.abs().max()) for w in want.values()), default=0.0)
    errors = {}
    for name, reference in want.items():
        floor = max(1e-2 * largest, torch.finfo(reference.dtype).tiny)
        errors[name] = float((got[name] - reference).abs().max()) / max(float(reference.abs().max()), floor)
    return errors


#: Whether this torch's `torch.compile` takes a `guard_filter_fn` option (the torch versions that ship
#: `torch.compiler.skip_guard_on_globals_unsafe` with it; metaopt supports torch >= 2.4: without it every guard stays).
GUARD_FILTERS = hasattr(torch.compiler, "skip_guard_on_globals_unsafe")


def library_guard_filter(entries: Sequence[Any]) -> list[bool]:
    """Dynamo guard filter (`torch.compile(options={"guard_filter_fn": ...})`): keep every guard but those on the
    globals of torch's, metaopt's and Python's own modules, which the traced code reads as functions, modules,
    classes and their defaults.

    Why: Dynamo re-checks every guard before each call. For sinusoid MAML about half of the ~1000 guards are on
    such globals (the functions `torch.func.grad`, `vmap` and `functional_call` run through, and which module
    holds which), and at T=1 checking them on caches the rest of a training step left cold cost about a tenth of
    the call (`experiments/bench_step.py`). Those globals do not change while a process trains; what can change
    stays guarded: the meta-parameters, the loop's hyperparameters and modules (reached through the function's
    closure, not globals), the inputs' shapes, dtypes and devices, the global torch state (grad mode, default
    dtype, ...), and the globals of every other module, such as a user's loss or model reading a module-level
    constant. What is skipped: replacing a torch or metaopt function in place (monkeypatching) after a
    compilation is not seen by that compilation.

    Args:
      entries: Dynamo's `GuardFilterEntry`s (`name`: the guarded source, e.g. "G['__import_torch_dot_func'].grad";
        `is_global`).

    Returns:
      Per entry, whether to keep the guard.
    """
    # Entries are torch's unversioned data type: a field it lacks keeps the guard.
    return [not (getattr(entry, "is_global", False) and _library_global(str(getattr(entry, "name", ""))))
            for entry in entries]


def _library_global(name: str) -> bool:
    """Whether a global guard's source (e.g. "G['__import_metaopt_dot_loop'].unroll") is in torch's, metaopt's or
    the standard library's modules. Dynamo names the traced root frame's globals (this module's: `torch`,
    `vmap_tasks`, ...) and builtins directly, and other modules' as `__import_<module, dots as _dot_>`."""
    if not name.startswith("G['"):
        return False
    key = name[3:name.find("'", 3)]
    if not key.startswith("__import_"):
        return True  # this module's own globals, builtins (`__builtins_dict___N`), namedtuple scopes
    package = key[len("__import_"):].split("_dot_")[0]
    return package in ("torch", "metaopt") or _is_stdlib(package)


_STDLIB = os.path.realpath(sysconfig.get_paths()["stdlib"])


def _is_stdlib(package: str) -> bool:
    """Whether `package` is the standard library's: by name, and where it is loaded from a file, from the
    standard library's directory (a user's own package named `test` or `code` keeps its guards)."""
    if package not in sys.stdlib_module_names:
        return False
    file = getattr(sys.modules.get(package), "__file__", None)
    return file is None or os.path.realpath(file).startswith(_STDLIB + os.sep)


def default_options(device: str, inductor: bool = True) -> dict[str, Any]:
    """Options for a meta-gradient's `torch.compile` on `device` ("cpu", "cuda", ...): everywhere Dynamo skips
    the guards on library globals (`library_guard_filter`; Dynamo's option, for every backend); with Inductor on
    the CPU the kernels are called from generated C++ instead of Python (`cpp_wrapper`): a sinusoid MAML step has
    ~20 kernels and ~40 buffer allocations, and their Python calls were ~10% of the step at T=1
    (`experiments/bench_step.py`). Elsewhere Inductor's defaults (no GPU was at hand to measure the wrapper with
    CUDA graphs)."""
    options: dict[str, Any] = {"guard_filter_fn": library_guard_filter} if GUARD_FILTERS else {}
    if device == "cpu" and inductor:
        options["cpp_wrapper"] = True
    return options


def with_own_code(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with a copy of its code object (same globals, defaults and closure). Dynamo caches compiled code
    per code object, at most 8 variants, and under one code object's cache the first compilation's options win:
    every `Compiled` wrapper shares `meta_gradient`'s (and torch.func.grad's) code, so a process building several
    (tests, explorer workers) would hit the limit. A copy gives each compiled function a cache of its own."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


def _is_graph_break(error: Exception) -> bool:
    """Whether Dynamo refused the Python (a graph break under fullgraph): no other options change that."""
    return type(error).__name__ in ("Unsupported", "UserError") or "graph break" in str(error).lower()


def _replays_graphs(backend: str, mode: str | None, options: dict[str, Any] | None) -> bool:
    """`Compiled.replays_graphs` for these constructor arguments."""
    if backend != "inductor":
        return backend == "cudagraphs"
    effective = dict(options or {})
    if mode is not None:
        from torch._inductor import list_mode_options
        effective = {**list_mode_options(mode, dynamic=False), **effective}
    return bool(effective.get("triton.cudagraphs", False))


class Compiled:
    """An estimator whose vmapped chunks run as one compiled meta-gradient function.

    Behaves as the wrapped estimator everywhere (name, exactness, bias, memory law, checks:
    every attribute not defined here is the wrapped one's); only how a chunk's gradient is
    computed changes.

    Args:
      estimator: the estimator to compile (e.g. `Full()`, `FirstOrder()`).
      mode: `torch.compile`'s mode (None: default; "reduce-overhead" uses CUDA graphs on GPUs).
      options: `torch.compile` options (None: `default_options` for the tasks' device: no guards on library
        globals, `library_guard_filter`; on the CPU a C++ wrapper around the kernels, which drops ~40 us of Python
        per call at T=1 for ~10 s more compile time; a function whose C++ wrapper fails to build is compiled again
        without it before falling back).
      fullgraph: refuse graph breaks (a break means Python runs between kernels: the gain is gone).
      verify: check the first call at each input shape against eager (see the module docstring).
      choose: compile only where it pays (`compile: auto`): a training run plans it eager and compiled and runs
        the faster (`metaopt.compile_choice.choose_compiled`); False: always compiled.
      backend: `torch.compile`'s backend. "inductor" (the default) generates kernels. "cudagraphs" runs the
        traced graph with eager's kernels under CUDA graphs (torch's backend of that name: no code generation,
        the launches gone; on the CPU it runs the graph as "aot_eager" does): for a model whose eager kernels
        Inductor does not beat or compiles wrong (`Conv4(conv="matmul")` on CUDA, torch 2.11: README). The others
        locate a wrong result: "aot_eager" runs the traced forward and backward graphs eagerly,
        "aot_eager_decomp_partition" also Inductor's decompositions and partitioner, so a meta-gradient right
        there and wrong under "inductor" is Inductor's code generation (`experiments/compiled_exactness.py`).
        `mode` and `options` are Inductor's; every backend gets the guard filter (`library_guard_filter`).

    Attributes:
      fallback_reason: why the wrapper runs eager (None while compiled calls are in use).
      compile_seconds: seconds spent in first calls at new shapes (tracing, compiling, verifying).
      compiled_calls: chunks computed by the compiled function.
      first_calls: calls that traced (or tried to trace) a new input shape, the check against eager included: a
        train loop reports their memory apart from its steps' (`meta_train`'s "compile_peak_bytes").
    """

    def __init__(self, estimator: Differentiator, *, mode: str | None = None, options: dict[str, Any] | None = None,
                 fullgraph: bool = True, verify: bool = True, backend: str = "inductor", choose: bool = False):
        if isinstance(estimator, Compiled):
            estimator = estimator.eager
        if mode is not None:
            from torch._inductor import list_mode_options
            modes = list(list_mode_options())
            if mode not in modes:
                raise ValueError(f"Compiled: mode = {mode!r} is not a torch.compile mode; choose from "
                                 f"{', '.join(modes)} (or None: the default)")
        if backend != "inductor":
            from torch._dynamo import list_backends
            if backend not in list_backends(exclude_tags=()):
                raise ValueError(f"Compiled: backend = {backend!r} is not a torch.compile backend; e.g. inductor, "
                                 f"cudagraphs, aot_eager (all: torch._dynamo.list_backends(exclude_tags=()))")
        if backend != "inductor" and (mode is not None or options):
            raise ValueError(f"Compiled: mode = {mode!r}, options = {options!r} are Inductor's; backend = "
                             f"{backend!r} takes neither")
        self.backend, self.choose = backend, choose
        self.eager: Any = estimator  # an estimator (its name, declarations and task_objective)
        self.mode, self.options, self.fullgraph, self.verify = mode, options, fullgraph, verify
        self._replays_graphs = _replays_graphs(backend, mode, options)
        self.fallback_reason: str | None = None
        self.compile_seconds = 0.0
        self.compiled_calls = 0
        self.first_calls = 0
        self._functions: dict[tuple[int, int, tuple[int, ...], str, bool], Callable[..., Any]] = {}
        self._seen: set[tuple] = set()
        # Keyed by id, holding the objects themselves: an id is only reused after its object is gone.
        self._checked: dict[tuple[int, int], tuple[InnerLoop, MetaParams]] = {}
        self._blockers: dict[int, tuple[InnerLoop, str | None]] = {}
        self._stacked_blockers: dict[tuple[int, int], tuple[InnerLoop, MetaParams, str | None]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "eager":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.eager, name)

    @property
    def compiled(self) -> bool:
        """Whether meta-gradients are computed compiled (False after a fallback)."""
        return self.fallback_reason is None

    @property
    def replays_graphs(self) -> bool:
        """Whether the compiled function may replay CUDA graphs (outputs in buffers the next call overwrites): the
        "cudagraphs" backend, or Inductor's `triton.cudagraphs` option as the mode sets it ("reduce-overhead",
        "max-autotune") and the options override it. Fixed by the constructor's arguments: worked out once there,
        not at every call."""
        return self._replays_graphs

    def candidates(self, loop: InnerLoop, meta: MetaParams, steps: int) -> list["Compiled"]:
        return [self]

    def check(self, loop: InnerLoop, meta: MetaParams) -> None:
        """The estimator's check, once per (loop, meta): the compiled step pays no per-call Python re-checks."""
        if (id(loop), id(meta)) not in self._checked:
            self.eager.check(loop, meta)
            self._checked[(id(loop), id(meta))] = (loop, meta)

    def vmap_blocker(self, loop: InnerLoop) -> str | None:
        if id(loop) not in self._blockers:
            self._blockers[id(loop)] = (loop, self.eager.vmap_blocker(loop))
        return self._blockers[id(loop)][1]

    def stacked_blocker(self, loop: InnerLoop, meta: MetaParams) -> str | None:
        key = (id(loop), id(meta))
        if key not in self._stacked_blockers:
            self._stacked_blockers[key] = (loop, meta, self.eager.stacked_blocker(loop, meta))
        return self._stacked_blockers[key][2]

    def stacked_slower(self, loop: InnerLoop, meta: MetaParams) -> str | None:
        """Why `batching="auto"` vmaps rather than stacks: compiled, a vmapped chunk ran 3-8% faster than the
        stacked trace of the same chunk at T=5 and 20 and the same within noise at T=1 (sinusoid MAML, meta-batch
        25, 2 threads, alternated; README's compiled path), where eager stacking is the faster one (1.3-1.6x).
        A backend without code generation runs eager's kernels, and stacked ones the faster: "aot_eager" stacked
        1.77 / 5.44 / 21.1 ms against vmapped 1.96 / 6.75 / 26.6 ms at T = 1 / 5 / 20 (eager stacked 1.90 / 6.38
        / 25.9 ms; `python experiments/bench_step.py --compile --no-higher --only metaopt metaopt-aot-stacked
        metaopt-aot-vmap`, 2 threads). There, and after a fallback to eager, the eager reason."""
        if self.fallback_reason is None and self.backend == "inductor":
            return "compiled, a vmapped chunk runs faster than a stacked one"
        return self.eager.stacked_slower(loop, meta)

    def __call__(self, loop: InnerLoop, meta: MetaParams, tasks: Task | Sequence[Task],
                 budget: Budget | None = None, *, batching: Batching = "auto", chunk_size: int | None = None,
                 clock: Callable[[], float] | None = None,
                 memory_probe: Callable[[], int] | None = None) -> MetaGrad:
        """As `AbstractEstimator.__call__` (the runner), with compiled chunks."""
        result = run_meta_gradient(self, loop, meta, tasks, budget, batching=batching, chunk_size=chunk_size,
                                   clock=clock, memory_probe=memory_probe)
        if result.stats.get("batching") == "loop" and not self.compiled_calls and self.fallback_reason is None:
            self._fall_back(f"batching ran task by task ({batching!r}); only vmapped batches compile")
        return result

    def chunk_gradient(self, loop: InnerLoop, meta: MetaParams, tasks: Task, pattern: tuple[int, ...],
                       stacked: bool = False) -> ChunkResult | None:
        """The chunk's gradients, outer losses and stats from the compiled function, or None where the
        runner must compute it eagerly (after a fallback). `stacked`: trace the chunk on its task axis
        (`metaopt.stacked`) instead of vmapping the per-task objective."""
        if self.fallback_reason is not None:
            return None
        if not getattr(self.eager, "compiles", False):
            self._fall_back(f"estimator {self.eager.name!r} does not compile (its class declares compiles = False)")
            return None
        device = tasks.query.x.device.type
        key = (id(loop), id(meta), pattern, device, stacked)
        signature = (key, _signature(tasks, pattern))
        first = signature not in self._seen
        self.first_calls += first
        started = time.perf_counter()
        options = (self.options if self.options is not None else default_options(device)) \
            if self.backend == "inductor" else default_options(device, inductor=False)
        try:
            try:
                function = self._functions.get(key)
                if function is None:
                    function = self._functions[key] = self._build(loop, meta, pattern, options, stacked)
                grads, (losses, stats, mean_loss, used) = function(tasks)
            except Exception as error:
                if not (first and options.get("cpp_wrapper")) or _is_graph_break(error):
                    raise
                log.info("compile=true: the C++ wrapper failed (%s: %s); compiling without it",
                         type(error).__name__, str(error).splitlines()[0][:200] if str(error) else "")
                function = self._functions[key] = self._build(loop, meta, pattern, {**options, "cpp_wrapper": False},
                                                              stacked)
                grads, (losses, stats, mean_loss, used) = function(tasks)
        except Exception as error:  # a compile error or a graph break: eager from now on
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            self._fall_back(f"torch.compile failed: {type(error).__name__}: {' '.join(lines[:3])[:400]}")
            return None
        if self.replays_graphs:
            # CUDA graphs replay into the same output buffers: the caller keeps copies, not the buffers.
            grads = {k: g.clone() for k, g in grads.items()}
            losses, mean_loss, used = losses.clone(), mean_loss.clone(), used.clone()
        result = (grads, losses, stats, mean_loss, used)  # grad's outputs and aux carry no graph
        if first:
            if self.verify:
                eager = self._eager_chunk(loop, meta, tasks, pattern)
                mismatch = self._mismatch(result, eager, FLOAT32_RTOL.get(device, 1e-2))
                if mismatch is not None and tasks.query.x.dtype != torch.float64:
                    mismatch = self._refereed(mismatch, result, eager, loop, meta, tasks, pattern)
                if mismatch is not None:
                    self._fall_back(f"the compiled meta-gradient differs from eager: {mismatch}")
                    return None
            self._seen.add(signature)
            self.compile_seconds += time.perf_counter() - started
        self.compiled_calls += 1
        return result

    def _build(self, loop: InnerLoop, meta: MetaParams, pattern: tuple[int, ...],
               options: dict[str, Any], stacked: bool = False) -> Callable[..., Any]:
        estimator = self.eager

        def total(meta_now: MetaParams, tasks: Task) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor], Tensor, Tensor]]:
            if stacked:
                on_axis = StackedLoop(loop, tasks.query.x.shape[0], functional=True)
                result = estimator.task_objective(on_axis, meta_now, expand_support(tasks, pattern), None)
                surrogate, outer_loss, stats = result.surrogate, result.outer_loss, dict(result.stats)
            else:
                surrogate, outer_loss, stats = vmap_tasks(_objective_of(estimator, loop, meta_now), tasks, pattern)
            # The mean outer loss and the used-task mask in the graph (`ChunkResult`): ops after the call cost more.
            losses = outer_loss.detach().to(torch.get_default_dtype())
            return surrogate.mean(), (losses, stats, losses.mean(), torch.ones_like(losses, dtype=torch.bool))

        holder = MetaCall(meta)  # made here: a module created inside the traced function cannot be reparametrized

        def surrogate(values: dict[str, Tensor], tasks: Task) -> tuple[Tensor, Any]:
            return torch.func.functional_call(holder, {f"meta.{k}": v for k, v in values.items()}, (total, tasks))

        def meta_gradient(tasks: Task) -> Any:
            # The meta-parameters are read here, inside the traced function: Dynamo's guards (C++) then check
            # they are the same tensors that require grad, where reading them before each call walked the
            # module tree in Python (~17 us per call at T=1).
            return torch.func.grad(surrogate, has_aux=True)(meta_values(holder.meta), tasks)

        if self.backend != "inductor":
            return torch.compile(with_own_code(meta_gradient), fullgraph=self.fullgraph, backend=self.backend,
                                 options=dict(options) or None, dynamic=False)  # torch pops from it
        mode = self.mode
        if mode is not None and options:  # torch.compile takes a mode or options, not both: the mode as options
            from torch._inductor import list_mode_options
            options, mode = {**list_mode_options(mode, dynamic=False), **options}, None
        return torch.compile(with_own_code(meta_gradient), fullgraph=self.fullgraph, mode=mode,
                             options=dict(options) or None, dynamic=False)  # torch pops from it

    def _eager_chunk(self, loop: InnerLoop, meta: MetaParams, tasks: Task, pattern: tuple[int, ...]) -> ChunkResult:
        surrogate, outer_loss, stats = vmap_tasks(_objective_of(self.eager, loop, meta), tasks, pattern)
        grads = grads_of(surrogate.mean(), meta)
        losses = outer_loss.detach().to(torch.get_default_dtype())
        return (grads, losses, {k: v.detach() for k, v in stats.items()}, losses.mean(),
                torch.ones_like(losses, dtype=torch.bool))

    def _refereed(self, mismatch: str, compiled: ChunkResult, eager: ChunkResult, loop: InnerLoop, meta: MetaParams,
                  tasks: Task, pattern: tuple[int, ...]) -> str | None:
        """A float32 mismatch judged by eager float64 on the same tasks: None (compiled stands) if every compiled
        gradient is as close to float64 as eager float32's (within `REFEREE_FACTOR` times eager's error, or the
        device tolerance), else `mismatch` with the referee's figures. Rounding can make a gradient that is zero by
        construction (a convolution's bias before batch normalization) differ between any two float32 kernels by
        10% of the floor of `gradient_errors`; a wrong compiled gradient is far from float64 where eager is not."""
        try:
            loop64, meta64 = as_float64(loop, meta)
            reference = self._eager_chunk(loop64, meta64, tasks_as_float64(tasks), pattern)[0]
        except Exception as error:  # no referee (e.g. a loop holding tensors float64 cannot reach): the check stands
            return f"{mismatch} (no float64 referee: {type(error).__name__}: {str(error)[:100]})"
        compiled_errors = gradient_errors({k: g.double() for k, g in compiled[0].items()}, reference)
        eager_errors = gradient_errors({k: g.double() for k, g in eager[0].items()}, reference)
        rtol = FLOAT32_RTOL.get(tasks.query.x.device.type, 1e-2)
        for name, off in compiled_errors.items():
            if not off <= max(REFEREE_FACTOR * eager_errors[name], rtol):
                return (f"{mismatch}; against eager float64, compiled's {name!r} is off by {off:.2e} and eager "
                        f"float32's by {eager_errors[name]:.2e}")
        worst = max(compiled_errors, key=lambda k: compiled_errors[k] / max(eager_errors[k], 1e-30))
        log.info("compile=true: float32 %s; eager float64 referees: compiled %.2e vs eager float32 %.2e from it "
                 "(%r): compiled kept", mismatch, compiled_errors[worst], eager_errors[worst], worst)
        return None

    @staticmethod
    def _mismatch(compiled: ChunkResult, eager: ChunkResult, float32_rtol: float = 1e-4) -> str | None:
        """None if the two agree, else the worst entry said (`gradient_errors`). Float64 must agree to 1e-9,
        lower precisions to `float32_rtol` (see `FLOAT32_RTOL`)."""
        missing = sorted(set(eager[0]) - set(compiled[0]))
        if missing:
            return f"no gradient for {missing[0]!r}"
        for name, error in gradient_errors(compiled[0], eager[0]).items():
            rtol = 1e-9 if eager[0][name].dtype == torch.float64 else float32_rtol
            if not error <= rtol:  # NaN fails too
                return f"{name!r} relative error {error:.2e} > {rtol:.0e}"
        if not torch.allclose(compiled[1], eager[1], rtol=float32_rtol, atol=1e-6, equal_nan=True):
            return "the outer losses differ"
        return None

    def _fall_back(self, reason: str) -> None:
        if self.fallback_reason is None:
            self.fallback_reason = reason
            log.warning("compile=true: running %s eager: %s", self.eager.name, reason)

    def __repr__(self) -> str:
        return f"Compiled({self.eager!r})"
