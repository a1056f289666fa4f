"""A trained ProtoNet on Lake et al.'s within-alphabet 20-way protocol, scored with test-time variants of its metric.

    python experiments/protonet_distances.py RUN_DIR [RUN_DIR ...] [--n-tasks 600] [--data-root PATH] [--n-way 20]
        [--support-views 9] [--query-views 9] [--no-one-batch]

RUN_DIR is a ProtoNet run (or a pretrained classifier: experiment=omniglot_pretrain) with held-out alphabets (e.g.
a fold of experiments/omniglot_folds_runs.sh). Its
embedding scores the same seeded tasks as `omniglot_table.py`'s "20-way within alphabet" column (600 tasks,
20-way 1-shot, 5 queries per class, support and queries drawn by different people), a query going to the
nearest prototype under each variant (1-shot: a prototype is the support image's embedding):

  euclidean        the ProtoNet's own squared Euclidean distance (reproduces the table's column)
  l2-normalized    embeddings scaled to unit length first (cosine distance)
  centered l2      the mean of the task's 20 prototypes subtracted, then unit length (SimpleShot's CL2N,
                   Wang et al. 2019, with the task's support as the centre: no query is looked at)
  transductive     centered on the mean of prototypes *and* queries, then unit length (uses the test items)
  one batch        support and queries embedded in one forward pass, so BatchNorm normalizes them with the
                   same batch statistics (the loop embeds them separately, as it trains)

Several RUN_DIRs (runs with the same held-out alphabets, so the same seeded tasks) add a row for their
ensemble: each run's squared Euclidean distances divided by their mean over the task's queries (and their views)
and prototypes (runs trained apart have embeddings of different scales), summed over the runs; the nearest
prototype under the sum answers, as in an `ensemble=K` run (`metaopt.ensemble.ProtoNetEnsemble` under
`evaluate`). Each run's variants are its own rows.

--support-views / --query-views V embed every support image / query with its V - 1 nearest one-pixel shifts
(`Omniglot(support_views=V, query_views=V)`: the same seeded tasks): a prototype is the mean embedding of its
support's views, and a query's embedding the mean of its views' (`pooled_views`) under every variant.

Prints a markdown table (accuracy, 95% CI over tasks) and, last, `best=<variant>`. Evaluation only: one
forward pass per task and variant family, ~1 min per run and 600 tasks on one CPU thread.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from metaopt.prototypes import class_means
from metaopt.tasks.augment import pooled_views
from metaopt.train import mean_ci95
from omniglot_table import PROTOCOLS, load_run

PROTOCOL = PROTOCOLS["20-way within alphabet"]


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


#: variant -> (queries [Q, D], prototypes [N, D]) -> the two sets of embeddings to compare by Euclidean distance.
VARIANTS: dict[str, Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = {
    "euclidean": lambda q, c: (q, c),
    "l2-normalized": lambda q, c: (_unit(q), _unit(c)),
    "centered l2": lambda q, c: (_unit(q - c.mean(0)), _unit(c - c.mean(0))),
    "transductive": lambda q, c: (_unit(q - torch.cat([q, c]).mean(0)), _unit(c - torch.cat([q, c]).mean(0))),
}


class Embedded(NamedTuple):
    """One task under a run's embedding: queries [V, Q, D] (V views of each; V = 1 without query views),
    prototypes [N, D], the queries' labels [Q]."""

    queries: Tensor
    prototypes: Tensor
    labels: Tensor


class EmbeddedRun(NamedTuple):
    """A run's embedding of the protocol's seeded tasks: each task (`Embedded`), each task's accuracy with support
    and queries embedded as one batch (the "one batch" variant, which needs its own forward pass), and what the
    tasks were drawn from (the test alphabets and the seed: runs with equal `drawn_from` scored the same tasks)."""

    tasks: list[Embedded]
    one_batch: list[float]
    drawn_from: str


def embed_tasks(run_dir: Path, n_tasks: int, data_root: str | None = None, n_way: int = 20, support_views: int = 1,
                query_views: int = 1, one_batch: bool = True) -> EmbeddedRun:
    """The protocol's seeded tasks under the run's embedding (`EmbeddedRun`), with test-time views (see the
    module docstring); `one_batch=False` skips the "one batch" variant's second forward pass (then empty)."""
    cfg, parts = load_run(run_dir, {**PROTOCOL, "n_way": n_way, "support_views": support_views,
                                    "query_views": query_views}, data_root)
    classifier = str(cfg.loop.get("_target_", "")).endswith("ClassifierLoop")  # a head, but a ProtoNet at test
    if "n_way" not in cfg.loop or (cfg.model.get("out_features", 1) != 0 and not classifier):
        raise SystemExit(f"{run_dir}: not a ProtoNet run (loop.n_way and model.out_features=0, or loop=classifier)")
    if int(cfg.get("ensemble", 1)) > 1:
        raise SystemExit(f"{run_dir}: an ensemble run (ensemble={cfg.ensemble}); pass its members' directories "
                         f"({run_dir}/member0 ...), which this script scores alone and as an ensemble")
    loop, tasks = parts.loop, parts.eval_tasks
    assert tasks is not None
    batch_size = cfg.eval.get("batch_size", 20)
    generator = torch.Generator().manual_seed(cfg.eval.seed)  # the tasks `evaluate` draws: the same seed, batches
    embedded, joint_hits = [], []
    with torch.no_grad():
        state = loop.init(parts.meta)
        embed = lambda x: loop.forward(state.params, state.buffers, x)[0]  # noqa: E731
        for start in range(0, n_tasks, batch_size):
            batch = tasks.sample(min(batch_size, n_tasks - start), 1, generator)
            for i in range(batch.query.x.shape[0]):
                xs, ys = batch.support[0].x[i], batch.support[0].y[i]
                xq, yq = batch.query.x[i], batch.query.y[i]
                labels = yq[:len(yq) // query_views]
                queries = embed(xq).unflatten(0, (query_views, -1))  # [V, Q, D]
                embedded.append(Embedded(queries, class_means(embed(xs), ys, n_way).prototypes, labels))
                if not one_batch:
                    continue
                both = embed(torch.cat([xs, xq]))
                joint = class_means(both[:len(xs)], ys, n_way).prototypes
                queries = pooled_views(both[len(xs):], yq, query_views)[0]
                joint_hits.append((torch.cdist(queries, joint).argmin(1) == labels).double().mean().item())
    drawn_from = f"{', '.join(getattr(tasks, 'alphabets', [repr(tasks)]))} (seed {cfg.eval.seed})"
    return EmbeddedRun(embedded, joint_hits, drawn_from)


def score(run_dir: Path, n_tasks: int, data_root: str | None = None,
          n_way: int = 20) -> dict[str, tuple[float, float]]:
    """{variant: (accuracy, 95% CI)} of the run's embedding on the protocol's seeded tasks (`n_way`: the
    protocol's N, 20 for Lake's runs)."""
    return _variants(embed_tasks(run_dir, n_tasks, data_root, n_way))


def _variants(run: EmbeddedRun) -> dict[str, tuple[float, float]]:
    hits: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for task in run.tasks:
        for name, variant in VARIANTS.items():
            q, c = variant(task.queries.mean(0), task.prototypes)  # a query's views' mean embedding
            hits[name].append((torch.cdist(q, c).argmin(1) == task.labels).double().mean().item())
    if run.one_batch:
        hits["one batch"] = run.one_batch
    return {name: mean_ci95(torch.tensor(values)) for name, values in hits.items()}


def score_ensemble(runs: list[EmbeddedRun]) -> tuple[float, float]:
    """(accuracy, 95% CI) of the runs' ensemble (see the module docstring) on the same tasks embedded by each
    run (`embed_tasks`)."""
    drawn_from = {run.drawn_from for run in runs}
    if len(drawn_from) > 1:
        raise SystemExit(f"an ensemble needs runs that scored the same tasks; these drew them from {sorted(drawn_from)}")
    hits = []
    for tasks in zip(*(run.tasks for run in runs)):
        distances = [torch.cdist(t.queries, t.prototypes) ** 2 for t in tasks]  # [V, Q, N] per run
        total = torch.stack([d.mean(0) / d.mean() for d in distances]).sum(0)  # as `ProtoNetEnsemble` + `evaluate`
        hits.append((total.argmin(1) == tasks[0].labels).double().mean().item())
    return mean_ci95(torch.tensor(hits))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="+")
    parser.add_argument("--n-tasks", type=int, default=600)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--n-way", type=int, default=20)
    parser.add_argument("--support-views", type=int, default=1, help="views of every support image (1 to 9)")
    parser.add_argument("--query-views", type=int, default=1, help="views of every query (1 to 9)")
    parser.add_argument("--no-one-batch", dest="one_batch", action="store_false",
                        help="skip the one-batch variant (its own forward pass: about half the time)")
    args = parser.parse_args()
    results: dict[str, tuple[float, float]] = {}
    runs = []
    for run_dir in args.run_dir:
        runs.append(embed_tasks(run_dir, args.n_tasks, args.data_root, args.n_way, args.support_views,
                                args.query_views, args.one_batch))
        name = "" if len(args.run_dir) == 1 else f"{run_dir.name}: "
        results.update({name + variant: value for variant, value in _variants(runs[-1]).items()})
    if len(runs) > 1:
        results[f"ensemble of {len(runs)} (euclidean)"] = score_ensemble(runs)
    print(f"{', '.join(map(str, args.run_dir))}: {args.n_way}-way within alphabet, {args.n_tasks} tasks, "
          f"{args.support_views} support and {args.query_views} query views")
    print("| variant | accuracy (%) |\n|---|---|")
    for name, (mean, ci) in results.items():
        print(f"| {name} | {100 * mean:.1f} ± {100 * ci:.1f} |")
    print(f"best={max(results, key=lambda k: results[k][0])}")


if __name__ == "__main__":
    main()
