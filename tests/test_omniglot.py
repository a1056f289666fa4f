"""The Omniglot loader and sampler, on tiny data in the official layout that the test writes itself."""
from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from metaopt.tasks.augment import VIEW_OFFSETS, elastic, pooled_views, shifted, shifted_views, warped
from metaopt.tasks.omniglot import DRAWERS, Omniglot, OmniglotDataError, OmniglotEmptySplit, OmniglotImages


def _png(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand((12, 12), generator=g) > 0.5).to(torch.uint8) * 255
    out = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="L").save(out, format="PNG")
    return out.getvalue()


def _write(root: Path, subset: str, alphabets: dict[str, int], zipped: bool) -> None:
    files = {f"{subset}/{a}/character{c:02d}/{c:02d}{a[:2]}_{d:02d}.png": _png(hash((a, c, d)) % 10**6)
             for a, n in alphabets.items() for c in range(1, n + 1) for d in range(1, DRAWERS + 1)}
    if zipped:
        with zipfile.ZipFile(root / f"{subset}.zip", "w") as archive:
            for name, data in files.items():
                archive.writestr(name, data)
    else:
        for name, data in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(data)


@pytest.fixture
def data(tmp_path) -> Path:
    """Two overlapping zipped subsets (Greek in both), like the shared small1/small2 pair: 4 alphabets."""
    _write(tmp_path, "images_background_small1", {"Greek": 3, "Latin": 2, "Korean": 2}, zipped=True)
    _write(tmp_path, "images_background_small2", {"Greek": 3, "Tagalog": 2}, zipped=True)
    return tmp_path


def test_overlapping_subsets_count_each_file_once(data, tmp_path):
    images = OmniglotImages.load(data, size=8, cache_dir=tmp_path / "cache")
    assert images.images.shape == (3 + 2 + 2 + 2, DRAWERS, 8, 8)
    assert sorted(set(images.alphabets)) == ["Greek", "Korean", "Latin", "Tagalog"]
    assert images.images.dtype == torch.uint8 and images.images.max() > 0


def test_zipped_and_unzipped_layouts_load_the_same(tmp_path):
    zipped, folders = tmp_path / "z", tmp_path / "f"
    zipped.mkdir(), folders.mkdir()
    _write(zipped, "images_background", {"Latin": 2}, zipped=True)
    _write(folders, "images_background", {"Latin": 2}, zipped=False)
    a = OmniglotImages.load(zipped, size=8, cache_dir=tmp_path / "c1")
    b = OmniglotImages.load(folders, size=8, cache_dir=tmp_path / "c2")
    assert torch.equal(a.images, b.images) and a.characters == b.characters


def test_cache_is_reused(data, tmp_path):
    first = OmniglotImages.load(data, size=8, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("omniglot-*.pt"))) == 1
    second = OmniglotImages.load(data, size=8, cache_dir=tmp_path / "cache")
    assert torch.equal(first.images, second.images)


def test_alphabet_split_is_disjoint_and_rotations_add_classes(data, tmp_path):
    kwargs = dict(size=8, cache_dir=tmp_path / "cache", val_alphabets=1, test_alphabets=1, n_way=2)
    splits = {s: Omniglot(data, split=s, **kwargs) for s in ("train", "val", "test")}
    alphabets = [set(o.alphabets) for o in splits.values()]
    assert not (alphabets[0] & alphabets[1] or alphabets[0] & alphabets[2] or alphabets[1] & alphabets[2])
    assert sum(len(a) for a in alphabets) == 4
    plain = Omniglot(data, split="train", rotations=False, **kwargs)
    assert splits["train"].num_classes == 4 * plain.num_classes


def test_flips_add_the_mirrored_classes_with_their_rotations_as_alphabets_of_their_own(data, tmp_path):
    kwargs = dict(size=8, cache_dir=tmp_path / "cache", val_alphabets=1, test_alphabets=1, n_way=2)
    rotated = Omniglot(data, split="train", **kwargs)
    flipped = Omniglot(data, split="train", flips=True, within_alphabet=True, **kwargs)
    n = rotated.num_classes
    assert flipped.num_classes == 2 * n and torch.equal(flipped.images[:n], rotated.images)
    plain = n // 4
    # Class block t = rotation + 4 * mirrored: block 4 is the characters mirrored left-right, block 5 those rotated.
    assert torch.equal(flipped.images[4 * plain:5 * plain], rotated.images[:plain].flip(-1))
    assert torch.equal(flipped.images[5 * plain:6 * plain], torch.rot90(rotated.images[:plain].flip(-1), 1, (-2, -1)))
    assert len(flipped.groups) == 2 * len(rotated.groups) == 8 * len(flipped.alphabets)
    classes, _ = flipped.draw(100, torch.Generator().manual_seed(0))
    groups = flipped.class_groups[classes]
    assert (groups == groups[:, :1]).all()  # never a task mixing mirrored and plain characters
    assert {flipped.groups[g][1] for g in groups[:, 0].tolist()} == set(range(8))
    assert "mirrored classes" in repr(flipped)


def test_named_test_alphabets_are_held_out_and_validation_drawn_from_the_rest(data, tmp_path):
    """Cross-validation folds: the test alphabets by name (any order), the validation alphabet from the others."""
    kwargs = dict(size=8, cache_dir=tmp_path / "cache", val_alphabets=1, n_way=2)
    for fold in (["Tagalog", "Greek"], ["Korean"], "Latin"):
        splits = {s: Omniglot(data, split=s, test_alphabets=fold, **kwargs) for s in ("train", "val", "test")}
        named = [fold] if isinstance(fold, str) else fold
        assert splits["test"].alphabets == sorted(named)
        assert len(splits["val"].alphabets) == 1 and not set(splits["val"].alphabets) & set(named)
        assert set(splits["train"].alphabets) == {"Greek", "Korean", "Latin", "Tagalog"} - set(named) - set(
            splits["val"].alphabets)
    with pytest.raises(OmniglotDataError, match="must name distinct alphabets .*unknown: \\['Klingon'\\]"):
        Omniglot(data, test_alphabets=["Greek", "Klingon"], **kwargs)
    with pytest.raises(OmniglotDataError, match="leaves no training alphabet"):
        Omniglot(data, test_alphabets=["Greek", "Korean", "Latin"], **kwargs)
    with pytest.raises(OmniglotDataError, match="only split_by='alphabet' holds out"):
        Omniglot(data, test_alphabets=["Greek"], split_by="background", **kwargs)


def test_background_split_trains_on_background_and_tests_on_evaluation(data, tmp_path):
    """Lake et al.'s split: images_evaluation's alphabets are the test split; without them the test split is
    empty (a clear OmniglotEmptySplit) and every background alphabet trains."""
    kwargs = dict(size=8, split_by="background", n_way=2)
    train = Omniglot(data, cache_dir=tmp_path / "c1", val_alphabets=0, **kwargs)
    assert train.alphabets == ["Greek", "Korean", "Latin", "Tagalog"]
    with pytest.raises(OmniglotEmptySplit, match="test split holds no character .*images_evaluation"):
        Omniglot(data, cache_dir=tmp_path / "c1", split="test", val_alphabets=0, **kwargs)
    with pytest.raises(OmniglotDataError, match="4 alphabets cannot hold out 4"):
        Omniglot(data, cache_dir=tmp_path / "c1", val_alphabets=4, **kwargs)
    _write(data, "images_evaluation", {"Mongolian": 2, "Latin_evaluation_like": 2}, zipped=False)
    splits = {s: Omniglot(data, cache_dir=tmp_path / "c2", split=s, val_alphabets=1, **kwargs)
              for s in ("train", "val", "test")}
    assert splits["test"].alphabets == ["Latin_evaluation_like", "Mongolian"]
    assert len(splits["val"].alphabets) == 1 and len(splits["train"].alphabets) == 3
    assert set(splits["val"].alphabets) | set(splits["train"].alphabets) == {"Greek", "Korean", "Latin", "Tagalog"}
    by_alphabet = Omniglot(data, cache_dir=tmp_path / "c2", split="train", val_alphabets=1, test_alphabets=1, size=8,
                           n_way=2)
    assert len(by_alphabet.alphabets) == 4  # split_by="alphabet" shuffles all 6 alphabets together


def test_sampler_shapes_labels_and_reproducibility(data, tmp_path):
    omniglot = Omniglot(data, n_way=3, k_shot=2, k_query=4, size=8, cache_dir=tmp_path / "cache",
                        split_by="character", test_fraction=0.2, val_fraction=0.0)
    task = omniglot.sample(5, 2, torch.Generator().manual_seed(0))
    assert task.support[0].x.shape == (5, 6, 1, 8, 8) and task.query.x.shape == (5, 12, 1, 8, 8)
    assert task.support[0].y[0].tolist() == [0, 0, 1, 1, 2, 2] and task.inner_steps == 2
    assert 0.0 <= task.query.x.min() and task.query.x.max() <= 1.0
    again = omniglot.sample(5, 2, torch.Generator().manual_seed(0))
    assert torch.equal(task.query.x, again.query.x)
    # Support and query images of a class are different drawings.
    assert not any(torch.equal(task.support[0].x[0, 0], task.query.x[0, q]) for q in range(4))


def test_clear_errors(data, tmp_path):
    with pytest.raises(OmniglotDataError, match="does not exist; point data.root"):
        Omniglot(tmp_path / "nowhere")
    with pytest.raises(OmniglotDataError, match=r"k_shot \+ k_query = 5 \+ 16 must be between 2 and the 20"):
        Omniglot(data, k_shot=5, k_query=16, cache_dir=tmp_path / "cache")
    with pytest.raises(OmniglotDataError, match="fewer than n_way = 500"):
        Omniglot(data, n_way=500, size=8, cache_dir=tmp_path / "cache")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "images_background.zip").write_bytes(b"this is not a zip")
    with pytest.raises(OmniglotDataError, match="images_background.zip' is not a readable zip"):
        OmniglotImages.load(broken, cache_dir=tmp_path / "cache")
    bad_image = tmp_path / "bad_image"
    _write(bad_image.mkdir() or bad_image, "images_background", {"Latin": 1}, zipped=False)
    next((bad_image / "images_background" / "Latin" / "character01").glob("*.png")).write_bytes(b"garbage")
    with pytest.raises(OmniglotDataError, match="cannot decode image"):
        OmniglotImages.load(bad_image, cache_dir=tmp_path / "cache")
    missing = tmp_path / "missing"
    _write(missing.mkdir() or missing, "images_background", {"Latin": 1}, zipped=False)
    next((missing / "images_background" / "Latin" / "character01").glob("*.png")).unlink()
    with pytest.raises(OmniglotDataError, match=r"need 20 drawings each; found \{'Latin/character01': 19\}"):
        OmniglotImages.load(missing, cache_dir=tmp_path / "cache")


def _write_runs(root: Path, n_runs: int = 2) -> None:
    for r in range(1, n_runs + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        lines = []
        for c in range(1, 21):
            (run / "training" / f"class{c:02d}.png").write_bytes(_png(1000 * r + c))
            (run / "test" / f"item{c:02d}.png").write_bytes(_png(1000 * r + 21 - c))  # its answer's drawing
            lines.append(f"run{r:02d}/test/item{c:02d}.png run{r:02d}/training/class{21 - c:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def test_one_shot_runs_reader(tmp_path):
    from metaopt.tasks.omniglot import load_one_shot_runs
    _write_runs(tmp_path)
    runs = load_one_shot_runs(tmp_path, size=8)
    assert [name for name, _ in runs] == ["run01", "run02"]
    task = runs[0][1]
    assert task.support[0].x.shape == (20, 1, 8, 8) and task.support[0].y.tolist() == list(range(20))
    assert task.query.y.tolist() == list(range(19, -1, -1))
    (tmp_path / "run02" / "test" / "item03.png").unlink()
    with pytest.raises(OmniglotDataError, match="item03.png' is missing"):
        load_one_shot_runs(tmp_path, size=8)


@pytest.mark.parametrize("split", ["background", "alphabet"])
def test_eval_omniglot_runs_contract(data, tmp_path, split, monkeypatch):
    """Train a tiny ProtoNet on generated Omniglot, then evaluate it on generated runs. With the default
    background split and no images_evaluation (as in the shared data) every alphabet trains and the meta-test
    is skipped, said why; with held-out alphabets the meta-test runs."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    train_dir, runs = tmp_path / "train", tmp_path / "runs"
    _write_runs(runs)
    # Held out: one run, which the scripts below score alone; the contract's default: an ensemble of two.
    held_out = (["task.split_by=alphabet", "task.val_alphabets=0", "task.test_alphabets=1", "ensemble=1"]
                if split == "alphabet" else [])
    trained = subprocess.run(
        [sys.executable, str(root / "experiments" / "train.py"), "experiment=omniglot_protonet", "debug=tiny",
         f"hydra.run.dir={train_dir}", f"data.root={data}", "task.size=16", "model.channels=4", "model.image_size=16",
         *held_out, "task.n_way=2", "task.k_query=2", "eval.task.n_way=2", "eval.val_task.n_way=2"],
        capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((train_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    if split == "alphabet":
        assert "test_accuracy" in metrics and "meta_test_skipped" not in metrics
        # The within-alphabet 20-way protocol cannot be formed from this data: skipped, said why.
        assert "fewer than n_way = 20" in metrics["protocols"]["within_alphabet_20way"]["skipped"]
        # The table script scores the run on a chosen protocol, here with test-time support views.
        table = subprocess.run([sys.executable, str(root / "experiments" / "omniglot_table.py"), str(tmp_path),
                                "--protocols", "5-way", "--support-views", "3", "--query-views", "3", "--n-tasks", "4"],
                               capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert table.returncode == 0, table.stderr[-3000:]
        row = next(line for line in table.stdout.splitlines() if line.startswith("| omniglot_protonet (train) |"))
        five_way, twenty_way = row.split(" | ")[4:6]
        assert "±" in five_way and twenty_way == "—"
        # Test-time metric variants: the ProtoNet's own distance scores exactly what `evaluate` scores.
        monkeypatch.syspath_prepend(str(root / "experiments"))
        from omniglot_table import evaluate_run
        from protonet_distances import PROTOCOL, VARIANTS, embed_tasks, score, score_ensemble
        monkeypatch.setenv("HOME", str(tmp_path))  # the image cache of the runs above
        variants = score(train_dir, 4, n_way=2)
        assert set(variants) == {*VARIANTS, "one batch"}
        (accuracy, _), *_ = evaluate_run(train_dir, {**PROTOCOL, "n_way": 2}, 4, None)
        assert variants["euclidean"][0] == pytest.approx(accuracy, abs=1e-12)
        from omniglot_table import load_run, tuning_gain
        cfg, _ = load_run(train_dir, {**PROTOCOL, "n_way": 2}, None, inner_steps=3)  # the table's --inner-steps
        assert cfg.eval.inner_steps == 3 != load_run(train_dir, {**PROTOCOL, "n_way": 2}, None)[0].eval.inner_steps
        from metaopt.support_tuning import SupportTuning  # the table's --support-tuning-steps and -gain
        tuning = SupportTuning(steps=2, lr=0.01)
        (tuned, _), *_ = evaluate_run(train_dir, {**PROTOCOL, "n_way": 2}, 4, None, tuning)
        gain = tuning_gain(train_dir, {**PROTOCOL, "n_way": 2}, 4, None, tuning)
        assert gain["untuned"][0] == pytest.approx(accuracy, abs=1e-6)  # the same tasks, task by task
        assert gain["tuned"][0] == pytest.approx(tuned, abs=1e-6)
        assert gain["gain"][0] == pytest.approx(gain["tuned"][0] - gain["untuned"][0], abs=1e-6)  # float32 scores
        # With views, `evaluate` averages a query's logits and this script its embedding: the same answers.
        viewed = embed_tasks(train_dir, 4, n_way=2, support_views=3, query_views=5)
        (pooled, _), *_ = evaluate_run(train_dir, {**PROTOCOL, "n_way": 2, "support_views": 3, "query_views": 5},
                                       4, None)
        assert viewed.tasks[0].queries.shape == (5, 2 * 5, 4)  # 5 views of 2 classes x 5 queries; 4 channels
        hits = [(torch.cdist(t.queries.mean(0), t.prototypes).argmin(1) == t.labels).double().mean()
                for t in viewed.tasks]
        assert torch.stack(hits).mean().item() == pytest.approx(pooled, abs=1e-6)  # float32 accuracies
        # An ensemble of a run with itself answers as the run does; runs that scored other tasks are refused.
        run = embed_tasks(train_dir, 4, n_way=2)
        assert score_ensemble([run, run])[0] == pytest.approx(accuracy, abs=1e-12)
        with pytest.raises(SystemExit, match="scored the same tasks"):
            score_ensemble([run, run._replace(drawn_from="other alphabets (seed 1)")])
    else:
        assert [m["seed"] for m in metrics["members"]] == [0, 1]  # the default: two runs, meta-tested as one
        assert "test_accuracy" not in metrics and "images_evaluation" in metrics["meta_test_skipped"]
        assert "images_evaluation" in metrics["protocols"]["within_alphabet_20way"]["skipped"]
        assert "meta-test skipped" in trained.stdout
    result = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                             f"checkpoint={train_dir}", f"runs_dir={runs}", "hydra.run.dir=" + str(tmp_path / "e")],
                            capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    # Each test item is a copy of its answer's drawing: identical embeddings, distance 0, no error.
    assert last == "error_rate=0.00"
    assert "test-time views: 9 of each training image, 9 of each test item" in result.stdout  # a ProtoNet's default
    assert "; 20 steps of support tuning (lr 0.0001)" in result.stdout  # and so is the support tuning
    if split == "background":  # test-time views of the training images: a prototype is the mean of 9 views
        views = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                                f"checkpoint={train_dir}", f"runs_dir={runs}", "support_views=9",
                                "hydra.run.dir=" + str(tmp_path / "e9")],
                               capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert views.returncode == 0, views.stderr[-3000:]
        lines = views.stdout.strip().splitlines()
        assert len([line for line in lines if line.startswith("run")]) == 2
        assert 0 <= float(lines[-1].removeprefix("error_rate=")) <= 100
        # A ProtoNet's default is 9 views of the test items too (each item's views are its answer's views, so
        # the mean of their embeddings is its answer's prototype: distance 0); without any, the images alone.
        both = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                               f"checkpoint={train_dir}", f"runs_dir={runs}", "support_views=1", "query_views=1",
                               "support_tuning_steps=0", "hydra.run.dir=" + str(tmp_path / "e99")],
                              capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert both.returncode == 0, both.stderr[-3000:]
        assert both.stdout.strip().splitlines()[-1] == "error_rate=0.00"
        assert "support tuning" not in both.stdout
        refused = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                                  f"checkpoint={train_dir}", f"runs_dir={runs}", "support_views=10",
                                  "hydra.run.dir=" + str(tmp_path / "e10")],
                                 capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert refused.returncode != 0 and "support_views=10 must be between 1 and 9" in refused.stderr
        refused = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                                  f"checkpoint={train_dir}", f"runs_dir={runs}", "query_views=0",
                                  "hydra.run.dir=" + str(tmp_path / "e0")],
                                 capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert refused.returncode != 0 and "query_views=0 must be between 1 and 9" in refused.stderr


def test_an_ensemble_run_trains_standalone_members_and_answers_as_one(data, tmp_path, monkeypatch):
    """`ensemble=2` trains member1 bit for bit as the standalone run with seed 1, meta-tests the two as one, keeps
    both in its checkpoint (which Lake's runs are scored with), and refuses members that are not ProtoNets."""
    import json
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    runs = tmp_path / "runs"
    _write_runs(runs)
    common = [sys.executable, str(root / "experiments" / "train.py"), "experiment=omniglot_protonet", "debug=tiny",
              f"data.root={data}", "task.size=16", "model.channels=4", "model.image_size=16", "task.split_by=alphabet",
              "task.val_alphabets=0", "task.test_alphabets=1", "task.n_way=2", "task.k_query=2", "eval.task.n_way=2",
              "eval.val_task.n_way=2"]
    for args in (["ensemble=2", "job_time_limit=10m", f"hydra.run.dir={tmp_path / 'ens'}"],
                 ["seed=1", "ensemble=1", f"hydra.run.dir={tmp_path / 'solo'}"]):
        trained = subprocess.run([*common, *args], capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = json.loads((tmp_path / "ens" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and "test_accuracy" in metrics
    assert [m["seed"] for m in metrics["members"]] == [0, 1] and metrics["meta_steps"] == 2 + 2
    # The job's limit: the ensemble's evaluation planned before the members train; each member a share of the rest.
    assert metrics["job_time_limit"] == 600 and metrics["job_within_limit"]
    assert any(k.startswith("the final evaluation") for k in metrics["job_reserved"])
    shares = [json.loads((tmp_path / "ens" / f"member{i}" / "metrics.json").read_text())["job_time_limit"]
              for i in (0, 1)]
    assert shares[0] < shares[1] == pytest.approx(600 - metrics["job_reserved_seconds"])  # then the evaluations
    # A dry run of the finished ensemble prices what its members' checkpoints have left: nothing (2 steps each done).
    priced = subprocess.run([*common, "ensemble=2", "dry_run=true", f"hydra.run.dir={tmp_path / 'ens'}"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert priced.returncode == 0, priced.stderr[-3000:]
    record = json.loads((tmp_path / "ens" / "dry_run.json").read_text())
    assert (record["meta_steps"], record["resumed_from_meta_step"], record["predicted_train_seconds"]) == (0, 4, 0.0)
    member = torch.load(tmp_path / "ens" / "member1" / "checkpoint.pt", weights_only=False)["meta"]
    alone = torch.load(tmp_path / "solo" / "checkpoint.pt", weights_only=False)["meta"]
    both = torch.load(tmp_path / "ens" / "checkpoint.pt", weights_only=False)["meta"]
    assert member.keys() == alone.keys() and all(torch.equal(member[k], alone[k]) for k in alone)
    assert all(torch.equal(both[f"member1.{k}"], alone[k]) for k in alone) and len(both) == 2 * len(alone)
    from metaopt_hydra.summary import collect_runs
    assert {row["run"] for row in collect_runs(tmp_path)} == {"ens", "solo"}  # members belong to their run
    scored = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                             f"checkpoint={tmp_path / 'ens'}", f"runs_dir={runs}", f"hydra.run.dir={tmp_path / 'e'}"],
                            capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert scored.stdout.strip().splitlines()[-1] == "error_rate=0.00"  # each item a copy of its answer's drawing
    tuned = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                            f"checkpoint={tmp_path / 'ens'}", f"runs_dir={runs}", "support_tuning_steps=2",
                            "support_tuning_lr=0.01", f"hydra.run.dir={tmp_path / 'et'}"],
                           capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert tuned.returncode == 0, tuned.stderr[-3000:]  # every member tunes on each run's training images
    assert "; 2 steps of support tuning (lr 0.01)" in tuned.stdout
    assert 0 <= float(tuned.stdout.strip().splitlines()[-1].removeprefix("error_rate=")) <= 100
    # Its members scored apart and summed by protonet_distances.py answer as the run's `ProtoNetEnsemble` does.
    monkeypatch.syspath_prepend(str(root / "experiments"))
    from omniglot_table import evaluate_run
    from protonet_distances import PROTOCOL, embed_tasks, score_ensemble
    monkeypatch.setenv("HOME", str(tmp_path))  # the image cache of the runs above
    views = {"n_way": 2, "support_views": 3, "query_views": 5}
    (accuracy, _), *_ = evaluate_run(tmp_path / "ens", {**PROTOCOL, **views}, 8, None)
    members = [embed_tasks(tmp_path / "ens" / f"member{i}", 8, n_way=2, support_views=3, query_views=5,
                           one_batch=False) for i in (0, 1)]
    assert members[0].one_batch == []
    assert score_ensemble(members)[0] == pytest.approx(accuracy, abs=1e-6)
    with pytest.raises(SystemExit, match="an ensemble run"):
        embed_tasks(tmp_path / "ens", 8, n_way=2)
    maml = subprocess.run([*common[:2], "experiment=omniglot_maml", *common[3:-2], "ensemble=2",
                           f"hydra.run.dir={tmp_path / 'maml'}"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=300)
    assert maml.returncode != 0 and "PrototypeLoops" in maml.stderr
    assert not (tmp_path / "maml" / "member0").exists()  # refused before any training


def _tiny_run_and_scorer(data: Path, tmp_path: Path, *overrides: str):
    """Trains a tiny run (`debug=tiny`, 16-px images, every background alphabet) with `overrides` in a subprocess
    and generates Lake's runs' layout; returns `score(*args) -> CompletedProcess` of eval_omniglot_runs.py on them."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    train_dir, runs = tmp_path / "train", tmp_path / "runs"
    _write_runs(runs)
    trained = subprocess.run(
        [sys.executable, str(root / "experiments" / "train.py"), "debug=tiny", f"hydra.run.dir={train_dir}",
         f"data.root={data}", "task.size=16", "model.channels=4", "model.image_size=16", "task.split_by=background",
         "task.val_alphabets=0", *overrides], capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert trained.returncode == 0, trained.stderr[-3000:]

    def score(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, str(root / "experiments" / "eval_omniglot_runs.py"),
                                 f"checkpoint={train_dir}", f"runs_dir={runs}", *args,
                                 "hydra.run.dir=" + str(tmp_path / f"e{len(args)}")],
                                capture_output=True, text=True, env=env, cwd=root, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result
    return score


def test_proto_maml_trained_on_fewer_ways_scores_the_20_way_runs(data, tmp_path):
    """Proto-MAML makes its head per task, so a 2-way-trained model answers Lake's 20-way runs (a MAML head
    could not); the runs' layout is generated."""
    score = _tiny_run_and_scorer(data, tmp_path, "experiment=omniglot_protomaml", "task.n_way=2", "task.k_query=2")
    result = score()
    # A two-step model adapts badly at 20 ways (its inner lr 0.4 overshoots there): the figure is not the point.
    assert 0 <= float(result.stdout.strip().splitlines()[-1].removeprefix("error_rate=")) <= 100
    assert "test-time views: 9 of each training image, 9 of each test item" in result.stdout  # every model's default
    assert "inner steps" not in result.stdout  # its run's own eval.inner_steps: 20 is MAML's default, not Proto-MAML's


def test_a_maml_run_with_a_20_way_head_scores_the_runs_with_views_by_default(data, tmp_path):
    """A MAML run (a fixed 20-way head) adapts on the 9 views of each training image and averages each test item's
    logits over its 9 views unless told; `support_views=1 query_views=1` scores the images alone."""
    score = _tiny_run_and_scorer(data, tmp_path, "experiment=omniglot_maml", "task.n_way=20", "task.k_query=1")
    # Trained with debug=tiny's 2 inner steps, it adapts with 20 unless told (DEFAULT_MAML_INNER_STEPS; README).
    for extra, shown in (((), "9 of each training image, 9 of each test item; inner steps: 20"),
                         (("support_views=1", "query_views=1", "inner_steps=3"),
                          "1 of each training image, 1 of each test item; inner steps: 3")):
        result = score(*extra)
        assert f"test-time views: {shown}" in result.stdout and "support tuning" not in result.stdout  # not MAML's
        lines = result.stdout.strip().splitlines()
        assert len([line for line in lines if line.startswith("run")]) == 2
        assert 0 <= float(lines[-1].removeprefix("error_rate=")) <= 100
    with pytest.raises(AssertionError, match="support tuning .2 steps. is for ProtoNets and their ensembles, not "
                                             "InnerLoop"):
        score("support_tuning_steps=2")  # refused before any run is scored: MAML adapts by its own inner steps
    with pytest.raises(AssertionError, match="inner_steps=0 must be >= 1"):
        score("inner_steps=0")


def test_within_alphabet_tasks_draw_every_class_from_one_alphabet_and_rotation(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write(data, "images_background", {"Greek": 4, "Latin": 3, "Korean": 2}, zipped=False)
    omniglot = Omniglot(data, n_way=3, k_shot=1, k_query=2, size=8, cache_dir=tmp_path / "cache",
                        split_by="character", test_fraction=0.0, val_fraction=0.0, within_alphabet=True)
    classes, _ = omniglot.draw(200, torch.Generator().manual_seed(0))
    groups = omniglot.class_groups[classes]                       # [tasks, N]
    assert (groups == groups[:, :1]).all()                        # one alphabet and rotation per task
    assert all(len(set(row.tolist())) == 3 for row in classes)    # N distinct classes
    names = {omniglot.groups[g][0] for g in groups[:, 0].tolist()}
    assert names == {"Greek", "Latin"}                            # Korean (2 characters) cannot hold 3-way tasks
    rotations = {omniglot.groups[g][1] for g in groups[:, 0].tolist()}
    assert rotations == {0, 1, 2, 3}
    with pytest.raises(OmniglotDataError, match="within_alphabet needs an alphabet with n_way = 5 characters; the "
                                                "largest of the train split .* has 4"):
        Omniglot(data, n_way=5, size=8, cache_dir=tmp_path / "cache", split_by="character", test_fraction=0.0,
                 val_fraction=0.0, within_alphabet=True)


def test_drawer_split_support_and_query_by_different_people(data, tmp_path):
    omniglot = Omniglot(data, n_way=3, k_shot=2, k_query=3, size=8, cache_dir=tmp_path / "cache",
                        split_by="character", test_fraction=0.0, val_fraction=0.0, drawer_split=True)
    _, drawers = omniglot.draw(100, torch.Generator().manual_seed(0))
    support, query = drawers[..., :2], drawers[..., 2:]
    assert (support == support[:, :1]).all() and (query == query[:, :1]).all()  # the same people for every class
    for s, q in zip(support[:, 0].tolist(), query[:, 0].tolist()):
        assert not set(s) & set(q)
    plain = Omniglot(data, n_way=3, k_shot=2, k_query=3, size=8, cache_dir=tmp_path / "cache",
                     split_by="character", test_fraction=0.0, val_fraction=0.0)
    _, mixed = plain.draw(100, torch.Generator().manual_seed(0))
    assert not (mixed[..., :2] == mixed[:, :1, :2]).all()  # without it each class has its own drawers


def test_prototype_loop_for_more_classes_scores_fewer_class_tasks_exactly():
    from metaopt import PrototypeLoop, losses, meta_params, unroll
    from metaopt.metaparams import Init
    from metaopt.models import MLP
    from metaopt.types import Batch
    torch.manual_seed(0)
    model = MLP(in_features=4, hidden=(8,), out_features=3)
    meta = meta_params(Init(model))
    support = Batch(torch.randn(10, 4), torch.arange(5).repeat(2))
    query = torch.randn(7, 4)
    scores = []
    for n_way in (5, 60):
        loop = PrototypeLoop(model=model, n_way=n_way)
        state = unroll(loop, loop.init(meta), [support], meta, create_graph=False)
        scores.append(loop.predict(state, query))
    assert scores[1].shape == (7, 60) and torch.equal(scores[1][:, :5], scores[0])
    y = torch.randint(5, (7,))
    assert torch.equal(losses.cross_entropy(scores[1], y), losses.cross_entropy(scores[0], y))
    assert torch.softmax(scores[1], -1)[:, 5:].max() == 0


def test_shift_moves_each_image_by_a_bounded_random_offset(data, tmp_path):
    x = torch.zeros(50, 1, 8, 8)
    x[:, :, 4, 4] = 1.0  # one lit pixel per image
    moved = shifted(x, 2, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape and (moved.sum(dim=(-1, -2)) == 1).all()  # nothing lost inside the bounds
    where = moved.reshape(50, -1).argmax(-1)
    rows, cols = where // 8, where % 8
    assert rows.min() >= 2 and rows.max() <= 6 and cols.min() >= 2 and cols.max() <= 6
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 5  # offsets differ between images
    omniglot = Omniglot(data, n_way=2, size=8, cache_dir=tmp_path / "cache", shift=1, split_by="character",
                        test_fraction=0.0, val_fraction=0.0)
    assert omniglot.sample(3, 1, torch.Generator().manual_seed(0)).query.x.shape == (3, 30, 1, 8, 8)
    with pytest.raises(OmniglotDataError, match="shift = 4 must be between 0 and half the image size 8"):
        Omniglot(data, size=8, cache_dir=tmp_path / "cache", shift=4)


def _sampled_with_and_without(data: Path, views: dict, n_tasks: int, steps: int, kwargs: dict):
    """(the distribution with `views`, tasks drawn without and with them from equal generators), after checking
    that the views drew nothing more."""
    plain, viewed = Omniglot(data, **kwargs), Omniglot(data, **views, **kwargs)
    generators = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = plain.sample(n_tasks, steps, generators[0]), viewed.sample(n_tasks, steps, generators[1])
    assert torch.equal(generators[0].get_state(), generators[1].get_state())  # nothing more drawn
    assert plain.query_views == 1
    return viewed, a, b


def test_support_views_add_one_pixel_shifts_of_the_support_and_draw_nothing(data, tmp_path):
    """Test-time views: the same task (classes, drawers, queries) with every support image followed by its
    shifted copies, each a one-pixel translation of it, labelled as it is."""
    x = torch.zeros(3, 1, 8, 8)
    x[:, :, 4, 4] = 1.0
    views = shifted_views(x, 9)
    assert views.shape == (9, 3, 1, 8, 8) and torch.equal(views[0], x)
    for view, (dy, dx) in zip(views, VIEW_OFFSETS):
        where = int(view[0, 0].flatten().argmax())
        assert (where // 8, where % 8) == (4 + dy, 4 + dx) and view.sum() == 3
    with pytest.raises(ValueError, match="between 1 and 9, got 10"):
        shifted_views(x, 10)
    kwargs = dict(n_way=3, k_shot=2, k_query=2, size=8, cache_dir=tmp_path / "cache", split_by="character",
                  test_fraction=0.0, val_fraction=0.0)
    viewed, a, b = _sampled_with_and_without(data, {"support_views": 5}, 4, 2, kwargs)
    assert torch.equal(a.query.x, b.query.x) and torch.equal(a.query.y, b.query.y)
    assert len(b.support) == 2 and b.support[0].x.shape == (4, 5 * 6, 1, 8, 8)
    support = b.support[0].x.view(4, 5, 6, 1, 8, 8)  # [tasks, views, N * K, ...]
    assert torch.equal(support[:, 0], a.support[0].x)
    assert torch.equal(support.transpose(0, 1), shifted_views(a.support[0].x, 5))
    assert torch.equal(b.support[0].y, a.support[0].y.repeat(1, 5))
    assert "5 views of each support image" in repr(viewed)
    with pytest.raises(OmniglotDataError, match="support_views = 0 must be between 1 and 9"):
        Omniglot(data, support_views=0, **kwargs)


def test_pooled_views_average_each_querys_views_and_refuse_other_shapes():
    """Queries are view-major ([views * n]): query i's views sit at i, n + i, 2n + i, ...; a regression task's
    labels, or predictions for other queries than the labels', are refused instead of pooled wrongly."""
    pred, y = torch.randn(2, 3 * 4, 5, generator=torch.Generator().manual_seed(0)), torch.arange(4).repeat(2, 3)
    pooled, labels = pooled_views(pred, y, 3)
    hand = torch.stack([pred[:, [i, 4 + i, 8 + i]].mean(1) for i in range(4)], 1)
    assert torch.equal(labels, y[:, :4]) and torch.allclose(pooled, hand, atol=1e-7)
    assert pooled_views(pred, y, 1) == (pred, y)
    with pytest.raises(ValueError, match="views of each query"):
        pooled_views(pred, y[:, :10], 3)  # 10 labels are not 3 views of whole queries
    with pytest.raises(ValueError, match="views of each query"):
        pooled_views(pred, y[:, :9], 3)  # predictions for 12 queries, labels for 9


def test_query_views_shift_every_query_and_evaluation_averages_its_predictions(data, tmp_path):
    """Test-time views of the queries: the same task with every query followed by its shifted copies; `evaluate`
    scores a query by its views' mean prediction, which for a ProtoNet answers as the views' mean embedding
    (checked against that, computed by hand)."""
    from metaopt import PrototypeLoop, evaluate, meta_params
    from metaopt.metaparams import Init
    from metaopt.models import MLP
    from metaopt.prototypes import class_means
    kwargs = dict(n_way=3, k_shot=1, k_query=4, size=8, cache_dir=tmp_path / "cache", split_by="character",
                  test_fraction=0.0, val_fraction=0.0)
    viewed, a, b = _sampled_with_and_without(data, {"query_views": 5}, 6, 1, kwargs)
    assert torch.equal(a.support[0].x, b.support[0].x) and viewed.query_views == 5
    queries = b.query.x.view(6, 5, 12, 1, 8, 8)  # [tasks, views, N * Q, ...]
    assert torch.equal(queries.transpose(0, 1), shifted_views(a.query.x, 5))
    assert torch.equal(b.query.y, a.query.y.repeat(1, 5)) and "5 views of each query" in repr(viewed)
    with pytest.raises(OmniglotDataError, match="query_views = 10 must be between 1 and 9"):
        Omniglot(data, query_views=10, **kwargs)

    torch.manual_seed(0)
    model = MLP(in_features=64, hidden=(16,), out_features=5)
    flat = torch.nn.Sequential(torch.nn.Flatten(), model)
    meta, loop = meta_params(Init(flat)), PrototypeLoop(model=flat, n_way=3)
    got = evaluate(loop, meta, viewed, n_tasks=6, batch_size=6, seed=1, return_per_task=True)["task_accuracies"]
    hits = []
    for support, query, y in zip(b.support[0].x, b.query.x, a.query.y):
        prototypes = class_means(flat(support), b.support[0].y[0], 3).prototypes
        embedded = flat(query).view(5, 12, -1).mean(0)  # each query's views' mean embedding
        hits.append((torch.cdist(embedded, prototypes).argmin(1) == y).double().mean())
    assert torch.allclose(got.double(), torch.stack(hits))


def test_warp_moves_a_point_where_the_drawn_affine_map_sends_it(data, tmp_path):
    """An independent check of the geometry: replay the generator's draws and send one lit point
    through rotation @ shear @ scale by hand; the warped image's centroid lands there."""
    size, n = 33, 40
    x = torch.zeros(n, 1, size, size, dtype=torch.float64)
    x[:, :, 16 - 6, 16 + 4] = 1.0  # 6 px above and 4 px right of the centre (row, col)
    out = warped(x, 20.0, 0.2, 0.15, torch.Generator().manual_seed(3))
    u = torch.rand((n, 5), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    angle = u[:, 0] * math.radians(20.0)
    point = torch.tensor([4.0, -6.0], dtype=torch.float64)  # (x right, y down) from the centre
    cos, sin = angle.cos(), angle.sin()
    for i in range(n):
        rotation = torch.tensor([[cos[i], -sin[i]], [sin[i], cos[i]]], dtype=torch.float64)
        shearing = torch.tensor([[1, u[i, 1] * 0.2], [u[i, 2] * 0.2, 1]], dtype=torch.float64)
        scaling = torch.diag(1 + u[i, 3:5] * 0.15)
        expected = rotation @ shearing @ scaling @ point
        mass = out[i, 0]
        rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                    indexing="ij")
        centroid = torch.stack([(mass * cols).sum(), (mass * rows).sum()]) / mass.sum() - 16
        assert torch.allclose(centroid, expected, atol=0.5), (i, centroid, expected)
    assert warped(x, 0.0, 0.0, 0.0, torch.Generator()) is x  # nothing asked: nothing done
    omniglot = Omniglot(data, n_way=2, size=8, cache_dir=tmp_path / "cache", split_by="character",
                        test_fraction=0.0, val_fraction=0.0, warp_degrees=10, warp_shear=0.3, warp_scale=0.2)
    assert "warped" in repr(omniglot)
    plain = Omniglot(data, n_way=2, size=8, cache_dir=tmp_path / "cache", split_by="character",
                     test_fraction=0.0, val_fraction=0.0)
    a, b = (o.sample(3, 1, torch.Generator().manual_seed(0)).query.x for o in (omniglot, plain))
    assert a.shape == b.shape and not torch.equal(a, b)
    with pytest.raises(OmniglotDataError, match="warp_shear = 1.5"):
        Omniglot(data, size=8, cache_dir=tmp_path / "cache", warp_shear=1.5)


def test_elastic_moves_a_point_against_its_drawn_displacement(data, tmp_path):
    """An independent check: replay the generator's noise, smooth it with a 2-D Gaussian kernel (not the separable
    one), scale it to the asked rms; the output pixel p reads the input at p + d(p), so a lit input point q lands at
    the p solving p + d(p) = q (found by fixed-point iteration over the field)."""
    size, n, pixels, sigma = 33, 30, 1.0, 4.0
    x = torch.zeros(n, 1, size, size, dtype=torch.float64)
    x[:, :, 12, 20] = 1.0  # row 12, column 20
    out = elastic(x, pixels, sigma, torch.Generator().manual_seed(3))
    noise = torch.rand((n, 2, size, size), generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    radius = math.ceil(3 * sigma)
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-(taps[:, None] ** 2 + taps[None, :] ** 2) / (2 * sigma ** 2))
    field = torch.nn.functional.conv2d(noise.reshape(2 * n, 1, size, size), (kernel / kernel.sum())[None, None],
                                       padding=radius).reshape(n, 2, size, size)
    field = field / field.pow(2).mean(dim=(2, 3), keepdim=True).sqrt() * pixels  # (dx, dy) in pixels
    rows, cols = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                                indexing="ij")
    moved = 0.0
    for i in range(n):
        p = torch.tensor([20.0, 12.0], dtype=torch.float64)  # (column, row)
        for _ in range(20):  # p = q - d(p), d read bilinearly at p
            c0, r0 = int(p[0]), int(p[1])
            fc, fr = p[0] - c0, p[1] - r0
            d = ((1 - fr) * ((1 - fc) * field[i, :, r0, c0] + fc * field[i, :, r0, c0 + 1])
                 + fr * ((1 - fc) * field[i, :, r0 + 1, c0] + fc * field[i, :, r0 + 1, c0 + 1]))
            p = torch.tensor([20.0, 12.0], dtype=torch.float64) - d
        mass = out[i, 0]
        centroid = torch.stack([(mass * cols).sum(), (mass * rows).sum()]) / mass.sum()
        assert torch.allclose(centroid, p, atol=0.3), (i, centroid, p)
        moved += float((p - torch.tensor([20.0, 12.0], dtype=torch.float64)).norm()) / n
    assert 0.5 < moved < 2.5  # about the asked rms displacement, 1 px per axis
    assert elastic(x, 0.0, sigma, torch.Generator()) is x  # nothing asked: nothing done
    kwargs = dict(n_way=2, size=8, cache_dir=tmp_path / "cache", split_by="character", test_fraction=0.0,
                  val_fraction=0.0)
    distorted, plain = Omniglot(data, elastic_pixels=1.0, **kwargs), Omniglot(data, **kwargs)
    assert "elastic distortions of 1.0 px" in repr(distorted)
    a, b = (o.sample(3, 1, torch.Generator().manual_seed(0)).query.x for o in (distorted, plain))
    assert a.shape == b.shape and not torch.equal(a, b)
    with pytest.raises(OmniglotDataError, match="elastic_sigma = 0"):
        Omniglot(data, size=8, cache_dir=tmp_path / "cache", elastic_pixels=1.0, elastic_sigma=0)


def test_tasks_gathered_on_another_device_are_the_same_tasks(data, tmp_path):
    """`Omniglot.to(device)` keeps the images on the device and gathers, converts, shifts and warps there, while
    the classes, drawers and augmentations are still drawn from the CPU generator: every tensor of a task is on
    the device ("meta" stands in for a GPU here: shapes and placement, no values), the generator advances as on
    the CPU, and the original distribution is untouched. Images already loaded can be given as `root`."""
    images = OmniglotImages.load(data, 8, tmp_path / "cache")
    omniglot = Omniglot(images, n_way=3, k_shot=1, k_query=2, size=8, shift=1, warp_degrees=10,
                        split_by="character", test_fraction=0.0, val_fraction=0.0)
    on_meta = omniglot.to("meta")
    assert on_meta.images.device.type == "meta" and omniglot.images.device.type == "cpu"
    cpu_generator, meta_generator = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    want = omniglot.sample(4, 2, cpu_generator)
    got = on_meta.sample(4, 2, meta_generator)
    leaves = [torch.utils._pytree.tree_leaves(task) for task in (got, want)]
    assert [a is None for a in leaves[0]] == [b is None for b in leaves[1]]  # no init either way
    for a, b in zip(*leaves):
        assert a is None or (a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype)
    assert torch.equal(cpu_generator.get_state(), meta_generator.get_state())
    assert torch.equal(omniglot.to("cpu").sample(4, 2, torch.Generator().manual_seed(3)).query.x, want.query.x)
    with pytest.raises(OmniglotDataError, match=r"the images given are \[8, 8\] pixels, not size = 28"):
        Omniglot(images)


def test_lake_layout_runs_pair_two_drawers_of_one_alphabet(tmp_path, monkeypatch):
    """experiments/make_lake_layout_runs.py: every run's 20 characters come from one alphabet, each test item is
    its answer's character drawn by another person than the training image, and the reader loads the runs."""
    from metaopt.tasks.omniglot import load_one_shot_runs
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "experiments"))
    from make_lake_layout_runs import make_runs
    sources = {}  # image bytes (each image distinct) -> (alphabet, character, drawer)
    with zipfile.ZipFile(tmp_path / "images_background_small1.zip", "w") as archive:  # zipped and plain sources
        for subset, alphabet, n in (("small1", "Greek", 21), ("small1", "Latin", 2), ("small2", "Korean", 20)):
            for c in range(1, n + 1):
                for d in range(1, 6):
                    name = f"images_background_{subset}/{alphabet}/character{c:02d}/{c:02d}_{d:02d}.png"
                    image = _png(len(sources))
                    sources[image] = (alphabet, f"character{c:02d}", d)
                    if subset == "small1":
                        archive.writestr(name, image)
                    else:
                        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
                        (tmp_path / name).write_bytes(image)
    assert len(sources) == (21 + 2 + 20) * 5
    make_runs(tmp_path, tmp_path / "runs", ["Greek", "Korean"], n_runs=2, seed=0)
    for r, alphabet in ((1, "Greek"), (2, "Korean")):
        run = tmp_path / "runs" / f"run{r:02d}"
        pairs = [line.split() for line in (run / "class_labels.txt").read_text().splitlines()]
        assert len(pairs) == 20 and len({answer for _, answer in pairs}) == 20
        trained = [sources[(tmp_path / "runs" / answer).read_bytes()] for _, answer in pairs]
        tested = [sources[(tmp_path / "runs" / item).read_bytes()] for item, _ in pairs]
        assert {t[0] for t in trained} == {t[0] for t in tested} == {alphabet}
        assert [t[1] for t in trained] == [t[1] for t in tested]  # the same character
        assert len({t[2] for t in trained}) == len({t[2] for t in tested}) == 1  # one drawer each ...
        assert trained[0][2] != tested[0][2]  # ... two different people
    runs = load_one_shot_runs(tmp_path / "runs", size=8)
    assert [name for name, _ in runs] == ["run01", "run02"] and runs[0][1].support[0].x.shape == (20, 1, 8, 8)
    with pytest.raises(ValueError, match="'Latin' has 2 characters"):
        make_runs(tmp_path, tmp_path / "other", ["Latin"], n_runs=1)


def test_global_labels_name_each_image_by_its_class_index(data, tmp_path):
    """`global_labels=True` labels every image by its class's index among the split's classes (supervised
    pretraining's batches); the images are the same as without it, and so is every class of a task."""
    kwargs = dict(n_way=5, k_shot=1, k_query=2, size=8, cache_dir=tmp_path / "cache", split_by="background",
                  val_alphabets=0)
    plain, labelled = Omniglot(data, **kwargs), Omniglot(data, global_labels=True, **kwargs)
    task, again = (o.sample(3, 0, torch.Generator().manual_seed(0)) for o in (plain, labelled))
    assert torch.equal(task.query.x, again.query.x) and task.inner_steps == 0
    assert "global class labels" in repr(labelled)
    assert task.query.y.max() < 5 and again.query.y.max() >= 5  # 36 classes: some index past the task's 5
    for x, y in zip(again.query.x.reshape(-1, 1, 8, 8), again.query.y.reshape(-1)):
        assert any(torch.equal(x, image.to(x.dtype) / 255.0) for image in labelled.images[y])  # one of its 20 drawings
    # Images of one task-label share one global label: the relabelling is a bijection per task.
    for local, global_ in zip(task.query.y, again.query.y):
        assert all(len(set(global_[local == k].tolist())) == 1 for k in range(5))


def test_a_pretrained_classifier_scores_the_runs_as_a_protonet(data, tmp_path):
    """experiment=omniglot_pretrain (a head over every training class, no inner step) trains and is scored on Lake's
    runs as a ProtoNet: views and support tuning by default. A head narrower than the training classes, or inner
    steps, are refused before training."""
    score = _tiny_run_and_scorer(data, tmp_path, "experiment=omniglot_pretrain", "task.n_way=4", "inner_steps=0")
    result = score("support_tuning_steps=2")
    assert "2 steps of support tuning" in result.stdout
    assert 0 <= float(result.stdout.strip().splitlines()[-1].removeprefix("error_rate=")) <= 100
    for i, (override, message) in enumerate((("model.out_features=30", "has 30 outputs but task=Omniglot labels 36 "
                                                                         "training classes"),
                                             ("inner_steps=1", "set inner_steps=0"))):
        (tmp_path / f"refused{i}").mkdir()
        with pytest.raises(AssertionError, match=message):
            _tiny_run_and_scorer(data, tmp_path / f"refused{i}", "experiment=omniglot_pretrain", "task.n_way=4",
                                 "inner_steps=0", override)


def test_validation_without_a_validation_split_draws_evaluation_tasks_from_the_training_split(data, tmp_path):
    """With no validation alphabet (task.val_alphabets=0) validation draws from the training split with
    eval.val_task's other settings: no shifts and, after supervised pretraining's globally labelled batches,
    tasks labelled 0..N-1 that a ProtoNet can score (the training distribution itself could not be)."""
    from hydra import compose, initialize_config_dir

    from metaopt_hydra.build import build
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("train", overrides=[
            "experiment=omniglot_pretrain", f"data.root={data}", f"task.cache_dir={tmp_path / 'cache'}", "task.size=16",
            "model.image_size=16", "model.channels=4", "task.split_by=background", "task.val_alphabets=0",
            "task.n_way=4"])
    parts = build(cfg)
    assert parts.tasks.global_labels and parts.tasks.shift == 2 and parts.tasks.split == "train"
    val = parts.val_tasks
    assert (val.split, val.global_labels, val.shift, val.n_way, val.k_query) == ("train", False, 0, 5, 15)
