"""The compiled path: compiled meta-gradients equal eager ones (and finite differences), or the wrapper falls
back to eager with the reason, never silently wrong. Each compile takes seconds: the fast suite compiles a few
(estimator, kind) pairs; the whole estimator x kind matrix is marked slow."""
from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.utils._pytree import tree_leaves

import metaopt as mo
import metaopt.compiled
from db import ESTIMATORS
from metaopt.compiled import Compiled, default_options, library_guard_filter
from problems import META_KINDS, central_difference, tiny_model, tiny_tasks

T = 2


def _problem(kind: str):
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.momentum(lr=0.05, momentum=0.5), mo.losses.mse)
    return loop, META_KINDS[kind](model), tiny_tasks(3, T)


def _assert_equal(result: mo.MetaGrad, reference: mo.MetaGrad) -> None:
    torch.testing.assert_close(result.outer_loss, reference.outer_loss, rtol=1e-10, atol=0)
    torch.testing.assert_close(result.task_losses, reference.task_losses, rtol=1e-10, atol=0)  # dtype too
    assert torch.equal(result.task_used, reference.task_used)
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-10, atol=1e-12, msg=f"gradient of {k}")


@pytest.mark.parametrize("name,kind,batching,options", [
    ("full", "init", "auto", {}), ("full", "init", "stacked", {}), ("full", "init+lrs_element", "auto", {}),
    ("first_order", "lrs_tensor", "auto", {}),
    ("truncated", "init+lrs_element", "stacked", {"k": 1})])  # its graph-free prefix, on the task axis
def test_compiled_equals_eager_in_float64(name, kind, batching, options):
    """Compiled, "auto" vmaps (the faster compiled trace); the stacked trace is there when asked for."""
    loop, meta, tasks = _problem(kind)
    compiled = mo.get_estimator(name, compile=True, **options)
    result = compiled(loop, meta, tasks, batching=batching)
    assert result.stats["batching"] == ("vmap" if batching == "auto" else batching)
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1 and compiled.compile_seconds > 0
    _assert_equal(result, mo.get_estimator(name, **options)(loop, meta, tasks, batching="vmap"))
    again = compiled(loop, meta, tasks, batching=batching)  # the cached function, no recompilation check
    assert compiled.compiled_calls == 2
    _assert_equal(again, result)


def test_the_compiled_function_reads_the_meta_parameters_at_every_call():
    """The meta-parameters are read inside the traced function (Dynamo guards them): an outer step in place, a
    replaced parameter and a frozen one are all seen, as eager sees them."""
    loop, meta, tasks = _problem("init+lrs_element")
    compiled, eager = mo.get_estimator("full", compile=True), mo.get_estimator("full")
    compiled(loop, meta, tasks)
    with torch.no_grad():
        for p in meta.parameters():
            p.mul_(0.9)  # an outer optimizer's step
    _assert_equal(compiled(loop, meta, tasks), eager(loop, meta, tasks))
    module, name = next((m, k) for m in meta.modules() for k in m._parameters)
    setattr(module, name, torch.nn.Parameter(getattr(module, name).detach() + 0.1))  # a new object
    _assert_equal(compiled(loop, meta, tasks), eager(loop, meta, tasks))
    getattr(module, name).requires_grad_(False)  # frozen: no gradient for it
    result, reference = compiled(loop, meta, tasks), eager(loop, meta, tasks)
    assert set(result.grads) == set(reference.grads) == {k for k, p in meta.named_parameters() if p.requires_grad}
    _assert_equal(result, reference)
    assert compiled.compiled and compiled.compiled_calls == 4


#: Read by `_scaled_mse` at every call: a global of this (a user's) module, which the compiled function must guard.
LOSS_SCALE = 1.0


def _scaled_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return LOSS_SCALE * mo.losses.mse(pred, target)


def test_the_globals_of_a_users_module_stay_guarded():
    """`default_options` skips the guards on torch's and metaopt's globals, not on others: a user's loss reading
    a module-level constant sees it change, as eager does."""
    global LOSS_SCALE
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), _scaled_mse)
    meta, tasks = META_KINDS["init"](model), tiny_tasks(3, T)
    compiled, eager = mo.get_estimator("full", compile=True), mo.get_estimator("full")
    try:
        first = compiled(loop, meta, tasks)
        _assert_equal(first, eager(loop, meta, tasks))
        LOSS_SCALE = 2.0
        second = compiled(loop, meta, tasks)
        _assert_equal(second, eager(loop, meta, tasks))
        assert compiled.compiled and compiled.compiled_calls == 2
        assert second.outer_loss.item() != first.outer_loss.item()
    finally:
        LOSS_SCALE = 1.0


def test_the_guard_filter_skips_library_globals_only(monkeypatch):
    class Entry:
        def __init__(self, name: str, is_global: bool = True):
            self.name, self.is_global = name, is_global

    names = {"G['torch'].func.grad": False, "G['__import_torch_dot__functorch_dot_vmap']._flat_vmap": False,
             "G['__import_metaopt_dot_loop'].unroll": False, "G['__builtins_dict___0']['len']": False,
             "G['__import_contextlib']": False, "G['vmap_tasks']": False,
             "G['__import_test_compiled'].LOSS_SCALE": True, "G['__import_mylab_dot_losses'].SCALE": True,
             "G['__import___main__'].WIDTH": True, "G['__import_code_dot_losses'].SCALE": True}
    entries = [Entry(n) for n in names] + [Entry("L['tasks'].query.x", is_global=False), Entry("", False)]
    # "code" is a standard library module's name too: a user's own package of that name keeps its guards.
    monkeypatch.setitem(sys.modules, "code", types.SimpleNamespace(__file__="/home/me/lab/code/__init__.py"))
    assert library_guard_filter(entries) == [*names.values(), True, True]
    assert library_guard_filter([object()]) == [True]  # an entry of another torch's making: kept
    if metaopt.compiled.GUARD_FILTERS:  # this torch takes the option
        assert default_options("cuda") == {"guard_filter_fn": library_guard_filter}
    monkeypatch.setattr(metaopt.compiled, "GUARD_FILTERS", False)  # a torch without the option: every guard
    assert default_options("cpu") == {"cpp_wrapper": True} and default_options("cuda") == {}


def test_compiled_full_matches_finite_differences():
    loop, meta, tasks = _problem("init+lrs_element")
    grads = mo.get_estimator("full", compile=True)(loop, meta, tasks).grads
    g = torch.Generator().manual_seed(5)
    direction = {k: torch.randn(p.shape, generator=g) for k, p in meta.named_parameters()}
    analytic = sum((grads[k] * d).sum() for k, d in direction.items()).item()
    assert analytic == pytest.approx(central_difference(loop, meta, tasks, direction), rel=1e-6, abs=1e-9)


def test_a_wrong_compiled_result_falls_back_to_eager():
    loop, meta, tasks = _problem("init")
    compiled = Compiled(mo.Full())

    def wrong(loop_, meta_, pattern, options, stacked=False):
        def function(tasks_):
            grads = {k: torch.zeros_like(p) for k, p in meta_.named_parameters() if p.requires_grad}
            n = tasks_.query.x.shape[0]
            return grads, (torch.zeros(n), {}, torch.zeros(()), torch.ones(n, dtype=torch.bool))
        return function

    compiled._build = wrong
    result = compiled(loop, meta, tasks)
    assert "differs from eager" in compiled.fallback_reason and not compiled.compiled
    _assert_equal(result, mo.Full()(loop, meta, tasks))
    # Compiled, "auto" vmapped; eager from now on, it stacks as the eager estimator does (its faster form).
    assert result.stats["batching"] == "vmap" and compiled(loop, meta, tasks).stats["batching"] == "stacked"


def test_a_compile_mode_compiles_beside_the_default_options():
    """`mode=` (e.g. "reduce-overhead": CUDA graphs) with metaopt's default options (guard filter, C++ wrapper):
    torch.compile refuses a mode and options together, so the mode goes in as its options. Before, every
    `mode=` call fell back to eager ("Either mode or options can be specified"), on the GPU too."""
    loop, meta, tasks = _problem("init")
    compiled = Compiled(mo.Full(), mode="reduce-overhead")
    result = compiled(loop, meta, tasks)
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    _assert_equal(result, mo.Full()(loop, meta, tasks))
    with pytest.raises(ValueError, match="'overhead' is not a torch.compile mode; choose from .*reduce-overhead"):
        Compiled(mo.Full(), mode="overhead")


def test_another_backend_compiles_with_it_and_refuses_inductors_settings(monkeypatch):
    """`backend="aot_eager"` (the traced forward and backward graphs run eagerly: where a wrong Inductor result is
    located) reaches torch.compile without Inductor's options and gives eager's meta-gradient; a mode or options
    with it are refused before anything is traced."""
    loop, meta, tasks = _problem("init")
    calls, compile_ = [], torch.compile

    def spy(fn, **kwargs):
        calls.append((kwargs.get("backend"), sorted(kwargs.get("options") or ()), kwargs.get("mode")))
        return compile_(fn, **kwargs)

    monkeypatch.setattr(torch, "compile", spy)
    compiled = Compiled(mo.Full(), backend="aot_eager")
    _assert_equal(compiled(loop, meta, tasks), mo.Full()(loop, meta, tasks))
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    guards = ["guard_filter_fn"] if metaopt.compiled.GUARD_FILTERS else []  # Dynamo's option: every backend's
    assert calls == [("aot_eager", guards, None)]
    for settings in ({"mode": "reduce-overhead"}, {"options": {"cpp_wrapper": False}}):
        with pytest.raises(ValueError, match="are Inductor's; backend = 'aot_eager' takes neither"):
            Compiled(mo.Full(), backend="aot_eager", **settings)
    with pytest.raises(ValueError, match="backend = 'aot_eagr' is not a torch.compile backend"):
        Compiled(mo.Full(), backend="aot_eagr")


def test_the_cudagraphs_backend_stacks_and_keeps_its_outputs_apart():
    """`backend="cudagraphs"` runs the traced graph on eager's kernels (CUDA graphs on a GPU; on the CPU torch
    skips them): eager's meta-gradient, chunks stacked under "auto" as eager stacks them (its kernels are eager's;
    Inductor's trace vmaps), and outputs copied out of the buffers a replay would overwrite."""
    loop, meta, tasks = _problem("init")
    compiled = Compiled(mo.Full(), backend="cudagraphs")
    assert compiled.replays_graphs and not Compiled(mo.Full()).replays_graphs
    assert Compiled(mo.Full(), mode="reduce-overhead").replays_graphs and Compiled(mo.Full(), mode="max-autotune")\
        .replays_graphs and not Compiled(mo.Full(), mode="max-autotune-no-cudagraphs").replays_graphs
    assert Compiled(mo.Full(), options={"triton.cudagraphs": True}).replays_graphs
    assert not Compiled(mo.Full(), mode="reduce-overhead", options={"triton.cudagraphs": False}).replays_graphs
    first = compiled(loop, meta, tasks)
    assert first.stats["batching"] == "stacked" and compiled.compiled_calls == 1
    _assert_equal(first, mo.Full()(loop, meta, tasks))
    expected = {k: g.clone() for k, g in first.grads.items()}
    (key, function), = compiled._functions.items()
    buffers: list = []

    def replayed(tasks_):  # as a CUDA graph replays: the same output buffers, overwritten at every call
        outputs = function(tasks_)
        if not buffers:
            buffers.append(outputs)
        for buffer, value in zip(tree_leaves(buffers[0]), tree_leaves(outputs)):
            buffer.copy_(value)
        return buffers[0]

    compiled._functions[key] = replayed
    kept = compiled(loop, meta, tasks)
    with torch.no_grad():
        for p in meta.parameters():
            p.mul_(0.9)
    second = compiled(loop, meta, tasks)  # overwrites the buffers: the result kept before must not change
    _assert_equal(second, mo.Full()(loop, meta, tasks))
    for k, g in expected.items():
        torch.testing.assert_close(kept.grads[k], g, rtol=0, atol=0)


def test_building_a_function_leaves_its_options_whole():
    """torch.compile pops Dynamo's `guard_filter_fn` out of the options it is given: `_build` passes a copy, so a
    retry without the C++ wrapper (`{**options, ...}`) keeps the guard filter."""
    loop, meta, tasks = _problem("init")
    for backend in ("inductor", "aot_eager"):
        options = default_options("cpu", inductor=backend == "inductor")
        Compiled(mo.Full(), backend=backend)._build(loop, meta, (0,) * T, options)
        assert options == default_options("cpu", inductor=backend == "inductor")


def test_a_failed_cpp_wrapper_is_compiled_again_without_it():
    loop, meta, tasks = _problem("init")
    compiled = Compiled(mo.Full())
    tried = []

    def flaky(loop_, meta_, pattern, options, stacked=False):
        tried.append(dict(options))
        if options.get("cpp_wrapper"):
            raise RuntimeError("CppCompileError: C++ compile error")

        def function(tasks_):
            grads, *aux = compiled._eager_chunk(loop_, meta_, tasks_, pattern)
            return grads, tuple(aux)
        return function

    compiled._build = flaky
    result = compiled(loop, meta, tasks)
    assert [o.get("cpp_wrapper") for o in tried] == [True, False] and default_options("cpu") == tried[0]
    assert tried[1] == {**tried[0], "cpp_wrapper": False}  # the guard filter stays
    assert compiled.compiled and compiled.compiled_calls == 1
    _assert_equal(result, mo.Full()(loop, meta, tasks))


def test_a_graph_break_falls_back_with_the_reason():
    class Breaking(mo.Full):
        def task_objective(self, loop, meta, task, guard):
            objective = super().task_objective(loop, meta, task, guard)
            print(objective.outer_loss)  # Python in the middle of the graph: fullgraph refuses it
            return objective

    loop, meta, tasks = _problem("init")
    compiled = Compiled(Breaking())
    result = compiled(loop, meta, tasks)
    assert compiled.fallback_reason.startswith("torch.compile failed") and compiled.compiled_calls == 0
    _assert_equal(result, mo.Full()(loop, meta, tasks))


def test_task_by_task_batching_runs_eager_and_says_so():
    loop, meta, tasks = _problem("init")
    compiled = mo.get_estimator("full", compile=True)
    result = compiled(loop, meta, tasks, batching="loop")
    assert "task by task" in compiled.fallback_reason
    _assert_equal(result, mo.Full()(loop, meta, tasks))


def test_an_estimator_that_does_not_declare_compiles_runs_eager_without_tracing():
    loop, meta, tasks = _problem("lrs_scalar")
    compiled = mo.get_estimator("forward", compile=True, max_scalars=20)
    result = compiled(loop, meta, tasks)
    assert "does not compile" in compiled.fallback_reason and compiled.compile_seconds == 0
    _assert_equal(result, mo.ForwardMode(max_scalars=20)(loop, meta, tasks))


def test_compile_is_refused_for_a_planning_policy_and_the_wrapper_reads_as_its_estimator():
    with pytest.raises(mo.EstimatorUnsupported, match="planning policy"):
        mo.get_estimator("auto", compile=True)
    wrapped = mo.get_estimator("truncated", compile=True, k=3)
    assert wrapped.name == "truncated" and wrapped.exact is False and wrapped.bias(10) == mo.Truncated(k=3).bias(10)
    assert Compiled(wrapped).eager is wrapped.eager  # no double wrapping


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(META_KINDS))
@pytest.mark.parametrize("info", ESTIMATORS, ids=str)
def test_compiled_matrix_equals_eager_or_falls_back(info, kind):
    if kind not in info.kinds:
        pytest.skip(f"{info} does not serve {kind}")
    loop, meta, tasks = _problem(kind)
    compiled = Compiled(info.make(T))
    torch.manual_seed(0)  # stochastic estimators draw the same directions in both calls
    result = compiled(loop, meta, tasks)
    torch.manual_seed(0)  # in the batching the compiled call ran (compiled, "auto" vmaps; eager, it may stack)
    _assert_equal(result, info.make(T)(loop, meta, tasks, batching=result.stats["batching"]))
    if compiled.eager.compiles:  # a declared estimator compiles every kind it serves
        assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    else:
        assert "does not compile" in compiled.fallback_reason


def test_the_check_against_eager_ignores_rounding_noise_but_not_errors():
    """A gradient that is zero up to rounding (conv bias under batch norm) differs between compiled and
    eager by noise: not a mismatch. A wrong small gradient, or a wrong large one, is (float32: 1e-4)."""
    from metaopt.compiled import Compiled

    def f32(*values):
        return torch.tensor(values, dtype=torch.float32)
    eager = ({"w": f32(1.0, -2.0), "bias": f32(3e-8, -1e-8), "small": f32(1e-3, 2e-3)}, f32(0.5), {})
    noisy = ({**eager[0], "bias": f32(-2e-8, 4e-8)}, eager[1], {})
    assert Compiled._mismatch(noisy, eager) is None
    wrong_small = ({**eager[0], "small": f32(1e-3, -2e-3)}, eager[1], {})
    assert "'small'" in Compiled._mismatch(wrong_small, eager)
    wrong_large = ({**eager[0], "w": f32(1.0, -2.01)}, eager[1], {})
    assert "'w'" in Compiled._mismatch(wrong_large, eager)
    assert "no gradient" in Compiled._mismatch(({"w": eager[0]["w"]}, eager[1], {}), eager)


def test_cuda_float32_tolerates_kernel_noise_but_not_a_wrong_gradient():
    """On CUDA, compiled and eager float32 conv gradients differ by up to ~3e-3 (other kernels): tolerated
    there, not on the CPU; a 5% error fails everywhere, and float64 keeps 1e-9."""
    from metaopt.compiled import FLOAT32_RTOL, Compiled

    eager = ({"w": torch.tensor([1.0, -2.0], dtype=torch.float32)}, torch.tensor(0.5, dtype=torch.float32), {})
    kernel_noise = ({"w": torch.tensor([1.0, -2.006], dtype=torch.float32)}, eager[1], {})
    assert Compiled._mismatch(kernel_noise, eager, FLOAT32_RTOL["cuda"]) is None
    assert "'w'" in Compiled._mismatch(kernel_noise, eager, FLOAT32_RTOL["cpu"])
    wrong = ({"w": torch.tensor([1.0, -2.1], dtype=torch.float32)}, eager[1], {})
    assert "'w'" in Compiled._mismatch(wrong, eager, FLOAT32_RTOL["cuda"])
    eager64 = ({"w": torch.tensor([1.0, -2.0], dtype=torch.float64)}, eager[1].double(), {})
    noise64 = ({"w": torch.tensor([1.0, -2.0 + 1e-6], dtype=torch.float64)}, eager[1].double(), {})
    assert "'w'" in Compiled._mismatch(noise64, eager64, FLOAT32_RTOL["cuda"])


@pytest.mark.slow  # a conv net's compile takes a minute on 2 CPU cores; the fast suite tests the check itself above
def test_a_batch_normalized_conv_net_compiles_without_a_false_mismatch():
    """conv4 (the GPU headline's model): its conv biases feed batch norm, so their gradients are zero up to
    rounding; the eager check used to call that noise a mismatch and fall back for every such model."""
    torch.manual_seed(0)
    model = mo.Conv4(1, 2, channels=2, image_size=16)
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.4), mo.losses.cross_entropy)
    meta = mo.meta_params(mo.Init(model))
    tasks = mo.RandomPatterns(n_way=2, k_shot=1, k_query=2, size=16).sample(2, 1, torch.Generator().manual_seed(0))
    compiled = mo.get_estimator("full", compile=True)
    result = compiled(loop, meta, tasks)
    assert compiled.fallback_reason is None and compiled.compiled_calls == 1
    reference = mo.get_estimator("full")(loop, meta, tasks)
    for k, g in reference.grads.items():
        torch.testing.assert_close(result.grads[k], g, rtol=1e-9, atol=1e-12, msg=f"gradient of {k}")


def test_a_float32_mismatch_is_refereed_by_eager_float64():
    """A float32 gradient that fails the eager check stands if eager float64 finds it as close as eager float32
    (rounding differs between kernels); one off by more than the tolerance and 10x eager's error is refused, with
    both figures. The
    referee works on float64 copies: the float32 loop and meta are untouched."""
    from torch.utils._pytree import tree_map_only

    from metaopt.batching import compress_support
    from metaopt.compiled import as_float64

    model = tiny_model().float()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.1), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    tasks, pattern = compress_support(tree_map_only(torch.Tensor, lambda v: v.float(), tiny_tasks(3, T)))
    compiled = Compiled(mo.Full())
    eager = compiled._eager_chunk(loop, meta, tasks, pattern)
    loop64, meta64 = as_float64(loop, meta)
    exact = compiled._eager_chunk(loop64, meta64, tree_map_only(torch.Tensor, torch.Tensor.double, tasks), pattern)[0]
    name = max(exact, key=lambda k: float(exact[k].abs().max()))
    off = (eager[0][name].double() - exact[name]).abs().max()
    assert 0 < off < 1e-5 * exact[name].abs().max()  # eager float32 rounds
    largest = int(exact[name].abs().argmax())

    def shifted(by: float):  # the largest gradient's largest entry moved by `by`
        grad = eager[0][name].clone()
        grad.view(-1)[largest] += by
        return {**eager[0], name: grad}, *eager[1:]

    assert compiled._refereed("m", shifted(2 * float(off)), eager, loop, meta, tasks, pattern) is None
    refused = compiled._refereed("m", shifted(1e-3 * float(exact[name].abs().max())), eager, loop, meta, tasks,
                                 pattern)  # 1e-3 relative: 10x the CPU's float32 tolerance, ~1e4x eager's error
    assert refused.startswith("m; against eager float64") and repr(name) in refused
    assert all(p.dtype == torch.float32 for p in [*meta.parameters(), *model.parameters()])


@pytest.mark.parametrize("compiled", [True, False])
def test_the_steps_that_trace_report_their_memory_apart(compiled, monkeypatch):
    """A step in which a compiled estimator traces a new shape (and checks it against eager) holds the compiler's
    memory as well (on the CPU conv4's first compiled step read 1.6x an eager step's RSS; README): meta_train
    reports its peak as "compile_peak_bytes", apart from "measured_peak_bytes", the steps' peak that the memory
    budget bounds. Eager, every measured step is a step."""
    import contextlib

    from metaopt import train as train_module
    from metaopt.memory import PeakMemory

    readings = iter([5000, 70, 80, 90])  # the measured steps' peaks, in order: the first one traces

    @contextlib.contextmanager
    def measured(device, method="auto"):
        peak = PeakMemory()
        yield peak
        peak.peak_bytes = next(readings) if method != "none" else 0

    monkeypatch.setattr(train_module, "measure_peak_memory", measured)
    model = tiny_model()
    loop = mo.InnerLoop(model, mo.optim.sgd(lr=0.05), mo.losses.mse)
    meta = mo.meta_params(mo.Init(model))
    estimator = Compiled(mo.Full(), backend="aot_eager") if compiled else mo.Full()
    metrics = mo.meta_train(loop, meta, estimator, mo.Sinusoid(k_shot=5), meta_steps=3, meta_batch_size=3,
                            inner_steps=2, eval_n_tasks=0, progress=False, memory_every=2,
                            outer_optimizer=torch.optim.SGD(meta.parameters(), lr=0.01))
    assert (metrics["compile_peak_bytes"], metrics["measured_peak_bytes"]) == ((5000, 80) if compiled else (-1, 5000))


def test_the_budget_guards_the_calls_after_the_one_that_traced():
    """The call that traces a new shape spends the compiler's memory and time (tracing, the check against eager;
    reported apart): the guard starts again after it, so a trace past the budget does not fail a chunk that fits,
    and a later call past the budget is still caught. Before, a compiled run under a budget 1.25x its eager
    prediction raised BudgetExceeded at its first step (conv4-16 on the CPU: 499 MB of RSS against 362 MB)."""
    loop, meta, tasks = _problem("init")
    compiled = Compiled(mo.Full(), backend="aot_eager")
    memory, build = [0], compiled._build

    def building(*args, **kwargs):
        memory[0] += 10_000_000  # the compiler's memory, held after the trace
        return build(*args, **kwargs)

    compiled._build = building
    budget, probe = mo.Budget(memory=1_000_000), (lambda: memory[0])
    _assert_equal(compiled(loop, meta, tasks, budget, memory_probe=probe), mo.Full()(loop, meta, tasks))
    assert compiled.first_calls == 1 and compiled.compiled_calls == 1
    (key, function), = compiled._functions.items()

    def heavier(tasks_):
        memory[0] += 2_000_000  # a call past the budget
        return function(tasks_)

    compiled._functions[key] = heavier
    with pytest.raises(mo.BudgetExceeded, match="past its memory budget of 1 MB"):
        compiled(loop, meta, tasks, budget, memory_probe=probe)
    assert compiled.first_calls == 1
