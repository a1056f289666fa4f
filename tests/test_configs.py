"""Every option of every config group composes and builds; the plain-Python API is what configs build."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import metaopt as mo
from metaopt.estimators import AbstractEstimator

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

from metaopt_hydra.build import build

GROUPS = ["task", "loop", "model", "metaparam", "inner_optim", "estimator", "budget", "outer_optim", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_options(group):
    assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("override", [f"{g}={o}" for g in GROUPS for o in _options(g)])
def test_every_option_composes_and_builds(override):
    # A task needs a model that takes its inputs (build checks it): pair each task with one.
    image_model = ["model=conv4", "model.out_features=${task.n_way}", "model.image_size=${task.size}",
                   "model.channels=8"]
    embedding = ["task=patterns", "model=conv4", "model.out_features=0", "model.channels=8"]
    extra = {"loop=protonet": embedding, "loop=protomaml": embedding,
             "loop=classifier": ["task=patterns", "model=conv4", "model.out_features=${task.n_way}",
                                 "model.channels=8", "inner_steps=0"],
             "experiment=omniglot_pretrain": ["inner_steps=0"],  # debug=tiny's 2 inner steps: refused (a test)
             "task=patterns": image_model, "task=omniglot": image_model,
             "task=digits": ["model.in_features=64", "model.out_features=10"],
             # a data slot makes the inner loop's inputs: built for images (build runs it on one support batch)
             "metaparam=augmentation": ["task=patterns", *image_model[1:], "model=conv4"],
             "metaparam=synthetic": ["task=digits", "model.in_features=64", "model.out_features=10"]}.get(override, [])
    cfg = _compose([override, "debug=tiny", *extra])  # ProtoNets needs a classification task
    if cfg.model._target_.endswith("Conv4") and cfg.task._target_.endswith("Sinusoid"):
        pytest.skip("conv4 needs an image task")
    if cfg.task._target_.endswith("Omniglot") and not (ROOT / cfg.data.root).exists():
        pytest.skip(f"no Omniglot data at {cfg.data.root}")
    parts = build(cfg)
    assert len(parts.meta) > 0
    assert isinstance(parts.estimator, (AbstractEstimator, mo.Auto))
    if override.startswith("estimator="):
        assert override == f"estimator={parts.estimator.name}"
    parts.loop.check(parts.meta)
    assert isinstance(instantiate(cfg.outer_optim)(parts.meta.parameters()), torch.optim.Optimizer)


def test_contract_top_level_overrides_exist_for_every_experiment():
    for experiment in _options("experiment"):
        cfg = _compose([f"experiment={experiment}", "inner_steps=3", "meta_steps=7", "seed=5"])
        assert (cfg.inner_steps, cfg.meta_steps, cfg.seed) == (3, 7, 5)


def test_metasgd_experiment_learns_element_rates_in_the_papers_range():
    cfg = _compose(["experiment=sinusoid_metasgd"])
    parts = build(cfg)
    rates = torch.cat([v.flatten() for v in parts.meta["optimizer"].lrs.values()])
    assert parts.meta["optimizer"].granularity == "element"
    assert 0.005 <= rates.min().item() and rates.max().item() <= 0.1 and rates.std() > 0


def test_unknown_estimator_in_config_is_a_clear_hydra_error():
    from hydra.errors import MissingConfigException
    with pytest.raises(MissingConfigException, match="estimator"):
        _compose(["estimator=fulll"])


@pytest.mark.parametrize("experiment", [e for e in _options("experiment") if e.startswith("omniglot")])
def test_omniglot_evaluation_tasks_never_take_the_training_augmentations(experiment):
    """Shifts, warps, elastic distortions and mirrored classes are training augmentations, and global labels
    supervised pretraining's: the meta-test, validation and protocol tasks (eval.task and its overrides) turn every
    one off, whatever the training task sets."""
    cfg = _compose([f"experiment={experiment}", "task.shift=2", "task.warp_degrees=10", "task.warp_shear=0.3",
                    "task.warp_scale=0.2", "task.flips=true", "task.global_labels=true", "task.elastic_pixels=1"])
    off = {"shift": 0, "warp_degrees": 0, "warp_shear": 0, "warp_scale": 0, "flips": False, "global_labels": False,
           "elastic_pixels": 0}
    for name in ("task", "val_task"):
        assert {k: cfg.eval[name][k] for k in off} == off, name


def test_compile_backend_reaches_the_compiled_estimator_and_a_mode_beside_it_is_refused():
    """`compile_backend=cudagraphs` builds `Compiled(backend="cudagraphs")`; a torch.compile mode is Inductor's, so
    with another backend the build refuses it (before any training), naming both."""
    from metaopt.compiled import Compiled
    estimator = build(_compose(["debug=tiny", "compile=true", "compile_backend=cudagraphs"])).estimator
    assert isinstance(estimator, Compiled) and estimator.backend == "cudagraphs" and estimator.mode is None
    assert build(_compose(["debug=tiny", "compile=true"])).estimator.backend == "inductor"
    with pytest.raises(ValueError, match="mode = 'reduce-overhead'.*backend = 'cudagraphs' takes neither"):
        build(_compose(["debug=tiny", "compile=true", "compile_backend=cudagraphs", "compile_mode=reduce-overhead"]))
