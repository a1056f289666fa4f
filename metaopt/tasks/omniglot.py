"""Omniglot (Lake et al. 2015): N-way K-shot tasks from the official layout, zipped or not.

The official layout is `images_background/`, `images_evaluation/` (or the
`images_background_small1/2` subsets), each `alphabet/character/drawer.png`,
as folders or as zips of those folders. `OmniglotImages.load(root)` reads every
such source under `root` (or `root` itself if it is one), counts a file that
appears in several sources once, decodes to grayscale, inverts (strokes = 1),
resizes, and caches the result as one uint8 tensor, so sampling a task is
tensor indexing (microseconds). Nothing is downloaded.
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import zipfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from metaopt import losses
from metaopt.checkpoint import load_checkpoint, save_atomic
from metaopt.tasks.augment import VIEW_OFFSETS, elastic, shifted, warped, with_views
from metaopt.tasks.base import EmptySplit, TaskDistribution
from metaopt.tasks.ranking import smallest_indices
from metaopt.types import Batch, LossFn, Task

__all__ = ["OmniglotImages", "Omniglot", "OmniglotDataError", "OmniglotEmptySplit", "load_one_shot_runs"]

DRAWERS = 20


class OmniglotDataError(ValueError):
    """The Omniglot data is missing, malformed or too small for the request."""


class OmniglotEmptySplit(OmniglotDataError, EmptySplit):
    """The split asked for holds no character (e.g. `split_by="background"`'s test split without
    `images_evaluation` under the root)."""


def _set_of(source: Path) -> str:
    """"evaluation" for an `images_evaluation*` source, else "background" (Lake et al.'s two sets)."""
    return "evaluation" if source.name.startswith("images_evaluation") else "background"


def _sources(root: Path) -> list[Path]:
    if not root.exists():
        raise OmniglotDataError(f"omniglot: {str(root)!r} does not exist; point data.root at a folder holding "
                                "images_background*/images_evaluation (folders or .zip files)")
    if root.is_file():
        return [root]
    found = sorted(p for p in root.iterdir() if p.name.startswith("images_") and (p.is_dir() or p.suffix == ".zip"))
    if found:
        return found
    if any(p.is_dir() for p in root.iterdir()):
        return [root]  # root is itself alphabet/character/drawer.png
    raise OmniglotDataError(f"omniglot: no images_* folders or zips under {str(root)!r}")


def _entries(source: Path) -> dict[tuple[str, str, str], tuple[Path, str]]:
    """(alphabet, character, file) -> (source, member) for every png of one source."""
    out = {}
    if source.suffix == ".zip":
        try:
            with zipfile.ZipFile(source) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise OmniglotDataError(f"omniglot: {str(source)!r} is not a readable zip ({e})") from None
        for name in names:
            parts = name.split("/")
            if name.endswith(".png") and len(parts) >= 3:
                out[(parts[-3], parts[-2], parts[-1])] = (source, name)
    else:
        for path in source.rglob("*.png"):
            rel = path.relative_to(source).parts
            if len(rel) >= 3:
                out[(rel[-3], rel[-2], rel[-1])] = (source, str(path))
    return out


def _decode(data: bytes, where: str, size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        image = Image.open(io.BytesIO(data)).convert("L").resize((size, size), Image.Resampling.BILINEAR)
    except (UnidentifiedImageError, OSError) as e:
        raise OmniglotDataError(f"omniglot: cannot decode image {where!r} ({e})") from None
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size)
    return 255 - pixels  # strokes are dark on white: make them 1


@dataclass
class OmniglotImages:
    """All characters as one tensor.

    Attributes:
      images: uint8 [characters, 20, size, size], strokes high.
      alphabets: the alphabet of each character.
      characters: "alphabet/characterNN" of each character.
      sets: "background" or "evaluation" for each character (from its source's name: Lake et al.'s
        `images_background*` vs `images_evaluation*`; anything else counts as background).
    """

    images: torch.Tensor
    alphabets: list[str]
    characters: list[str]
    sets: list[str]

    @classmethod
    def load(cls, root: str | os.PathLike, size: int = 28, cache_dir: str | os.PathLike | None = None) -> "OmniglotImages":
        """Read (or reuse the cache of) every Omniglot source under `root`.

        Raises:
          OmniglotDataError: a missing path, an unreadable zip or image, or a character
            without exactly 20 drawers (names the character).
        """
        entries: dict[tuple[str, str, str], tuple[Path, str]] = {}
        for source in _sources(Path(root)):
            for key, value in _entries(source).items():
                entries.setdefault(key, value)  # the same file in two subsets counts once
        if not entries:
            raise OmniglotDataError(f"omniglot: no .png images found under {str(root)!r}")
        keys = sorted(entries)
        sets = {key[:2]: _set_of(entries[key][0]) for key in keys}
        digest = hashlib.sha1(repr((keys, size, sorted(sets.items()))).encode()).hexdigest()[:16]
        cache = Path(cache_dir if cache_dir is not None else Path.home() / ".cache" / "metaopt") / f"omniglot-{digest}.pt"
        if cache.exists():
            cached = load_checkpoint(cache)
            return cls(cached["images"], cached["alphabets"], cached["characters"], cached["sets"])
        by_character: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for key in keys:
            by_character.setdefault(key[:2], []).append(key)
        bad = {f"{a}/{c}": len(v) for (a, c), v in by_character.items() if len(v) != DRAWERS}
        if bad:
            raise OmniglotDataError(f"omniglot: characters need {DRAWERS} drawings each; found {bad}")
        archives: dict[Path, zipfile.ZipFile] = {}
        images = torch.empty((len(by_character), DRAWERS, size, size), dtype=torch.uint8)
        try:
            for i, files in enumerate(by_character.values()):
                for j, key in enumerate(files):
                    source, member = entries[key]
                    if source.suffix == ".zip":
                        if source not in archives:
                            archives[source] = zipfile.ZipFile(source)
                        try:
                            data = archives[source].read(member)
                        except (zipfile.BadZipFile, OSError) as e:
                            raise OmniglotDataError(f"omniglot: cannot read {member!r} from {str(source)!r} ({e})") \
                                from None
                    else:
                        data = Path(member).read_bytes()
                    images[i, j] = _decode(data, member, size)
        finally:
            for archive in archives.values():
                archive.close()
        alphabets = [a for a, _ in by_character]
        characters = [f"{a}/{c}" for a, c in by_character]
        kinds = [sets[key] for key in by_character]
        save_atomic({"images": images, "alphabets": alphabets, "characters": characters, "sets": kinds}, cache)
        return cls(images, alphabets, characters, kinds)


class Omniglot(TaskDistribution):
    """N-way K-shot Q-query classification tasks from one split of Omniglot.

    Classes are characters, and with `rotations` each character rotated by 90,
    180 and 270 degrees is a further class (the standard augmentation; all
    rotations of a character stay in its split); `flips` adds the mirrored ones. Splits are fixed by `seed`:
    `split_by="alphabet"` holds out whole alphabets (`val_alphabets`,
    `test_alphabets` of them), `split_by="character"` holds out a fraction of the
    characters, and `split_by="background"` is Lake et al.'s split: train on the
    `images_background*` alphabets (less `val_alphabets` of them), test on the
    `images_evaluation` ones (an empty test split, `OmniglotEmptySplit`, where the root has
    none: the shared data's background subsets then all train). Each task draws N classes and
    K + Q distinct drawers per class; labels 0..N-1 follow the random class order. Images are
    float [1, size, size] in [0, 1].

    Lake et al.'s one-shot benchmark (the 20-way "runs") is harder than random
    classes: `within_alphabet` draws all N classes of a task from one alphabet
    (a character's rotations form their own alphabet, so a task never mixes
    orientations; an alphabet is drawn uniformly among those with at least N
    characters), and `drawer_split` draws each task's support and query images
    from different people (one shuffle of the 20 drawers per task: the first K
    drew every class's support, the next Q its queries).

    Args:
      root: the data folder (see `OmniglotImages.load`), or images already loaded (`OmniglotImages`, e.g.
        generated for a benchmark; `size` must then be theirs).
      n_way, k_shot, k_query: N, K, Q.
      split: "train", "val" or "test".
      split_by: "alphabet", "character" or "background".
      val_alphabets, test_alphabets: alphabets held out (split_by="alphabet"; "background" holds out
        `val_alphabets` background alphabets and tests on the evaluation set). `test_alphabets` is a
        count (drawn by `seed`) or the alphabets' names (e.g. ["Korean", "Latin"]: cross-validation folds);
        the validation alphabets are then drawn from the others.
      val_fraction, test_fraction: characters held out (split_by="character").
      rotations: add the rotated classes.
      flips: add every class mirrored left to right (and with `rotations`, its rotations) as further classes,
        twice the classes (a mirrored character is as plausible a character as a rotated one; training
        augmentation: set it to false for evaluation tasks). Its mirrored classes form alphabets of their own.
      within_alphabet: all N classes of a task from one alphabet (and one rotation).
      drawer_split: support and query of a task drawn by different people.
      shift: translate every sampled image by a random whole number of pixels in [-shift, shift] per axis
        (cheap training augmentation; 0: none; set it to 0 for evaluation tasks).
      warp_degrees, warp_shear, warp_scale: random affine distortions of every sampled image before the
        shift (Koch et al. 2015: 10, 0.3, 0.2): rotation in degrees, shear factor, per-axis scale change;
        0: none (see `metaopt.tasks.augment.warped`; training augmentation, like `shift`).
      elastic_pixels, elastic_sigma: Simard et al.'s elastic distortions of every sampled image after the warp: a
        smooth random displacement field (Gaussian-smoothed noise of `elastic_sigma` pixels) of rms
        `elastic_pixels` pixels; 0: none (`metaopt.tasks.augment.elastic`; training augmentation, like `shift`).
      support_views: each support image together with its nearest one-pixel shifts, this many images in all
        (1 to 9; `metaopt.tasks.augment.shifted_views`; 1: the image alone): test-time augmentation for
        evaluation tasks. A ProtoNet's prototype becomes the mean embedding of the views; MAML adapts on them.
        Nothing is drawn for them: the tasks (classes, drawers, queries) are those drawn without views.
      query_views: each query image together with its nearest one-pixel shifts, this many images in all (1 to 9;
        test-time augmentation, like `support_views`): evaluation averages a query's predictions over its views
        (`TaskDistribution.query_views`; for a ProtoNet, the same answers as the views' mean embedding).
      global_labels: label every image by its class's index among the split's classes (0..num_classes-1, the
        order of `images`) instead of 0..N-1 by the task's random class order: the batches of supervised
        pretraining (`metaopt.ClassifierLoop`: one head over every training class); false for evaluation tasks.
      size: image side in pixels.
      seed: fixes the split.
      cache_dir: where decoded images are cached (default ~/.cache/metaopt).

    Raises:
      OmniglotEmptySplit: the split holds no character.
      OmniglotDataError: K + Q > 20, too few classes in the split for N (with
        `within_alphabet`: no alphabet of the split with N characters), or bad data.
    """

    kind = "classification"

    def __init__(self, root: str | OmniglotImages, n_way: int = 5, k_shot: int = 1, k_query: int = 15,
                 split: Literal["train", "val", "test"] = "train",
                 split_by: Literal["alphabet", "character", "background"] = "alphabet", val_alphabets: int = 1,
                 test_alphabets: int | Sequence[str] = 2, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 rotations: bool = True, size: int = 28, seed: int = 0, cache_dir: str | None = None,
                 within_alphabet: bool = False, drawer_split: bool = False, shift: int = 0,
                 warp_degrees: float = 0.0, warp_shear: float = 0.0, warp_scale: float = 0.0,
                 support_views: int = 1, query_views: int = 1, flips: bool = False, global_labels: bool = False,
                 elastic_pixels: float = 0.0, elastic_sigma: float = 4.0):
        if k_shot < 1 or k_query < 1 or k_shot + k_query > DRAWERS:
            raise OmniglotDataError(f"omniglot: k_shot + k_query = {k_shot} + {k_query} must be between 2 and the "
                                    f"{DRAWERS} drawings each character has")
        if split not in ("train", "val", "test") or split_by not in ("alphabet", "character", "background"):
            raise OmniglotDataError(f"omniglot: split must be train/val/test and split_by alphabet/character/"
                                    f"background, got {split!r}, {split_by!r}")
        self.root, self.n_way, self.k_shot, self.k_query, self.split = root, n_way, k_shot, k_query, split
        self.within_alphabet, self.drawer_split, self.shift, self.flips = within_alphabet, drawer_split, shift, flips
        self.global_labels = global_labels
        if shift < 0 or 2 * shift >= size:
            raise OmniglotDataError(f"omniglot: shift = {shift} must be between 0 and half the image size {size}")
        if not (0 <= warp_degrees <= 180 and 0 <= warp_shear < 1 and 0 <= warp_scale < 1):
            raise OmniglotDataError(f"omniglot: warp_degrees = {warp_degrees} must be in [0, 180], warp_shear = "
                                    f"{warp_shear} and warp_scale = {warp_scale} in [0, 1)")
        self.warp_degrees, self.warp_shear, self.warp_scale = warp_degrees, warp_shear, warp_scale
        if elastic_pixels < 0 or elastic_sigma <= 0:
            raise OmniglotDataError(f"omniglot: elastic_pixels = {elastic_pixels} must be >= 0 and elastic_sigma = "
                                    f"{elastic_sigma} > 0")
        self.elastic_pixels, self.elastic_sigma = elastic_pixels, elastic_sigma
        for name, views in (("support_views", support_views), ("query_views", query_views)):
            if not 1 <= views <= len(VIEW_OFFSETS):
                raise OmniglotDataError(f"omniglot: {name} = {views} must be between 1 and {len(VIEW_OFFSETS)} (the "
                                        "image and its one-pixel shifts)")
        self.support_views, self.query_views = support_views, query_views
        if isinstance(root, OmniglotImages) and tuple(root.images.shape[2:]) != (size, size):
            raise OmniglotDataError(f"omniglot: the images given are {list(root.images.shape[2:])} pixels, not "
                                    f"size = {size}")
        data = root if isinstance(root, OmniglotImages) else OmniglotImages.load(root, size, cache_dir)
        chosen = _split(data, split, split_by, seed, val_alphabets, test_alphabets, val_fraction, test_fraction)
        if not chosen:
            raise OmniglotEmptySplit(
                f"omniglot: the {split} split holds no character (split_by={split_by!r}"
                + (", whose test alphabets are images_evaluation's, and there is none under "
                   f"{str(root)!r})" if split_by == "background" else
                   f", val_alphabets={val_alphabets}, test_alphabets={test_alphabets})"))
        self.alphabets = sorted({data.alphabets[i] for i in chosen})
        images = data.images[chosen]
        names = [data.alphabets[i] for i in chosen]
        turns = 4 if rotations else 1
        mirrors = [images, images.flip(3)] if flips else [images]
        # Class blocks in the order of their transform t = rotation + turns * mirrored.
        images = torch.cat([torch.rot90(m, r, dims=(2, 3)) for m in mirrors for r in range(turns)])
        transforms = turns * len(mirrors)
        self.images = images.unsqueeze(2)  # [classes, 20, 1, size, size]
        if self.images.shape[0] < n_way:
            raise OmniglotDataError(f"omniglot: the {split} split has {self.images.shape[0]} classes, fewer than "
                                    f"n_way = {n_way}")
        groups = sorted({(name, t) for name in names for t in range(transforms)})
        # The alphabet (with its transform: rotation, mirrored) of each class: [classes] indices into `self.groups`.
        self.groups = groups
        self.class_groups = torch.tensor([groups.index((name, t)) for t in range(transforms) for name in names])
        members = self.class_groups.unsqueeze(0) == torch.arange(len(groups)).unsqueeze(1)  # [groups, classes]
        # Alphabets (with their rotation) that can hold an N-way task: within_alphabet draws among these.
        self._alphabet_members = members[members.sum(dim=1) >= n_way]
        if within_alphabet and len(self._alphabet_members) == 0:
            largest = max(Counter(names).values())
            raise OmniglotDataError(f"omniglot: within_alphabet needs an alphabet with n_way = {n_way} characters; "
                                    f"the largest of the {split} split ({', '.join(self.alphabets)}) has {largest}")

    def __repr__(self) -> str:
        return (f"Omniglot({self.split}: {self.images.shape[0]} classes from {len(self.alphabets)} alphabets, "
                f"{self.n_way}-way {self.k_shot}-shot {self.k_query}-query"
                f"{', mirrored classes' if self.flips else ''}"
                f"{', within alphabet' if self.within_alphabet else ''}{', drawer split' if self.drawer_split else ''}"
                f"{f', shifts of {self.shift} px' if self.shift else ''}"
                f"{', global class labels' if self.global_labels else ''}"
                f"{', warped' if self.warp_degrees or self.warp_shear or self.warp_scale else ''}"
                f"{f', elastic distortions of {self.elastic_pixels} px' if self.elastic_pixels else ''}"
                f"{f', {self.support_views} views of each support image' if self.support_views > 1 else ''}"
                f"{f', {self.query_views} views of each query' if self.query_views > 1 else ''})")

    @property
    def loss_fn(self) -> LossFn:
        return losses.cross_entropy

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    def to(self, device: torch.device | str) -> "Omniglot":
        """A copy whose images ([classes, 20, 1, size, size] uint8: 15 MB for the 8 shared alphabets' 968
        classes with rotations, 60 MB for the full background set's 3856) live on `device`: tasks are gathered,
        converted and augmented there. `self` is unchanged."""
        moved = copy.copy(self)
        moved.images = self.images.to(device)
        return moved

    def draw(self, n_tasks: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The classes [n_tasks, N] and drawers [n_tasks, N, K + Q] of `n_tasks` tasks (the first K drawers of
        a class give its support); `sample` reads these images."""
        n, per_class = self.n_way, self.k_shot + self.k_query
        scores = torch.rand((n_tasks, self.num_classes), generator=generator)
        if self.within_alphabet:
            members = self._alphabet_members
            alphabet = torch.randint(len(members), (n_tasks,), generator=generator)
            scores = scores + (~members[alphabet]).to(scores.dtype)  # other alphabets' classes sort last
        classes = smallest_indices(scores, n)
        if self.drawer_split:  # one order of the drawers per task, shared by its classes
            drawers = smallest_indices(torch.rand((n_tasks, 1, DRAWERS), generator=generator), per_class)
            drawers = drawers.expand(n_tasks, n, per_class)
        else:
            drawers = smallest_indices(torch.rand((n_tasks, n, DRAWERS), generator=generator), per_class)
        return classes, drawers

    def sample(self, n_tasks: int, inner_steps: int, generator: torch.Generator) -> Task:
        n, per_class = self.n_way, self.k_shot + self.k_query
        device = self.images.device
        classes, drawers = self.draw(n_tasks, generator)
        x = self.images[classes.unsqueeze(-1).to(device), drawers.to(device)].to(torch.get_default_dtype()) / 255.0
        x = warped(x, self.warp_degrees, self.warp_shear, self.warp_scale, generator)
        x = elastic(x, self.elastic_pixels, self.elastic_sigma, generator)
        if self.shift:
            x = shifted(x, self.shift, generator)
        labels = classes.to(device) if self.global_labels else torch.arange(n, device=device).expand(n_tasks, n)
        y = labels.unsqueeze(-1).expand(n_tasks, n, per_class)
        shape = x.shape[3:]

        def flat(xs: torch.Tensor, ys: torch.Tensor) -> Batch:
            return Batch(xs.reshape(n_tasks, -1, *shape), ys.reshape(n_tasks, -1))

        support = flat(x[:, :, :self.k_shot], y[:, :, :self.k_shot])
        if self.support_views > 1:
            support = with_views(support, self.support_views)  # [tasks, views * N * K, ...]
        query = flat(x[:, :, self.k_shot:], y[:, :, self.k_shot:])
        if self.query_views > 1:
            query = with_views(query, self.query_views)  # [tasks, views * N * Q, ...]
        return Task.repeat(support, query, inner_steps)


def _split(data: OmniglotImages, split: str, split_by: str, seed: int, val_alphabets: int,
           test_alphabets: int | Sequence[str], val_fraction: float, test_fraction: float) -> list[int]:
    """The indices of `split`'s characters in `data` (see `Omniglot`; fixed by `seed`)."""
    order = torch.Generator().manual_seed(seed)
    if not isinstance(test_alphabets, int):
        if split_by != "alphabet":
            raise OmniglotDataError(f"omniglot: test_alphabets = {test_alphabets} names alphabets, which only "
                                    f"split_by='alphabet' holds out (split_by={split_by!r})")
        named = [test_alphabets] if isinstance(test_alphabets, str) else [str(a) for a in test_alphabets]
        return _split_named(data, split, order, val_alphabets, named)
    if split_by == "character":
        perm = torch.randperm(len(data.characters), generator=order).tolist()
        n_test, n_val = round(test_fraction * len(perm)), round(val_fraction * len(perm))
        parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        return sorted(parts[split])
    if split_by == "background":
        names = sorted({a for a, kind in zip(data.alphabets, data.sets) if kind == "background"})
        tested = sorted({a for a, kind in zip(data.alphabets, data.sets) if kind == "evaluation"})
        held_out = val_alphabets
    else:
        names, tested, held_out = sorted(set(data.alphabets)), [], val_alphabets + test_alphabets
    if held_out >= len(names):
        raise OmniglotDataError(f"omniglot: {len(names)} alphabets cannot hold out {held_out} "
                                f"(split_by={split_by!r}) and still train")
    shuffled = [names[i] for i in torch.randperm(len(names), generator=order)]
    if split_by == "alphabet":  # the test alphabets first: the same ones whatever val_alphabets is
        tested, shuffled = shuffled[:test_alphabets], shuffled[test_alphabets:]
    held = {"test": tested, "val": shuffled[:val_alphabets], "train": shuffled[val_alphabets:]}
    return [i for i, a in enumerate(data.alphabets) if a in held[split]]


def _split_named(data: OmniglotImages, split: str, order: torch.Generator, val_alphabets: int,
                 tested: list[str]) -> list[int]:
    """`_split` with the test alphabets named; the validation alphabets drawn from the others by `order`."""
    names = sorted(set(data.alphabets))
    unknown = [a for a in tested if a not in names]
    if unknown or not tested or len(set(tested)) != len(tested):
        raise OmniglotDataError(f"omniglot: test_alphabets = {tested} must name distinct alphabets of the data "
                                f"({', '.join(names)}); unknown: {unknown}")
    rest = [a for a in names if a not in tested]
    if val_alphabets >= len(rest):
        raise OmniglotDataError(f"omniglot: holding out {tested} and val_alphabets = {val_alphabets} leaves no "
                                f"training alphabet of {len(names)}")
    shuffled = [rest[i] for i in torch.randperm(len(rest), generator=order)]
    held = {"test": tested, "val": shuffled[:val_alphabets], "train": shuffled[val_alphabets:]}
    return [i for i, a in enumerate(data.alphabets) if a in held[split]]


def load_one_shot_runs(runs_dir: str | os.PathLike, size: int = 28) -> list[tuple[str, Task]]:
    """Lake et al.'s 20-way one-shot classification runs as tasks.

    Layout: `runNN/training/classMM.png` (one image per class), `runNN/test/itemMM.png`,
    and `runNN/class_labels.txt` whose lines read `runNN/test/itemMM.png runNN/training/classKK.png`.
    Each run becomes a task whose support is the training images (labels in the order of
    their sorted file names) and whose query is the test items with their answers.

    Raises:
      OmniglotDataError: no runs, a missing file, or an answer naming an unknown class.
    """
    root = Path(runs_dir)
    runs = sorted(p for p in root.glob("run*") if p.is_dir()) if root.is_dir() else []
    if not runs:
        raise OmniglotDataError(f"omniglot runs: no run*/ folders in {str(root)!r}")
    out = []
    for run in runs:
        labels_file = run / "class_labels.txt"
        if not labels_file.exists():
            raise OmniglotDataError(f"omniglot runs: {str(labels_file)!r} is missing")
        classes = sorted((run / "training").glob("*.png"))
        index = {f"{run.name}/training/{p.name}": i for i, p in enumerate(classes)}
        items, answers = [], []
        for line in labels_file.read_text().split("\n"):
            if not line.strip():
                continue
            item, answer = line.split()
            if answer not in index:
                raise OmniglotDataError(f"omniglot runs: {str(labels_file)!r} names {answer!r}, which is not in "
                                        f"{run.name}/training/")
            items.append(root / item)
            answers.append(index[answer])
        for path in [*classes, *items]:
            if not path.exists():
                raise OmniglotDataError(f"omniglot runs: {str(path)!r} is missing")

        def images(paths: list[Path]) -> torch.Tensor:
            stacked = torch.stack([_decode(p.read_bytes(), str(p), size) for p in paths])
            return (stacked.to(torch.get_default_dtype()) / 255.0).unsqueeze(1)

        support = Batch(images(classes), torch.arange(len(classes)))
        query = Batch(images(items), torch.tensor(answers))
        out.append((run.name, Task(support=(support,), query=query)))
    return out
