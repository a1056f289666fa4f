"""20-way one-shot runs in Lake et al.'s layout, drawn from alphabets of the shared data (a stand-in for the 20 runs).

    python experiments/make_lake_layout_runs.py DATA_ROOT OUT_DIR --alphabets Balinese Korean [--runs 20] [--seed 0]

Each run takes one alphabet (the first half of the runs the first alphabet, and so on), 20 of its characters at
random, and two different drawers: the training image of every character by one, the test item by the other, the
test items shuffled, as in Lake et al.'s runs (`runNN/class_labels.txt`, `runNN/training/classNN.png`,
`runNN/test/itemNN.png`). Scored by `python experiments/eval_omniglot_runs.py checkpoint=DIR runs_dir=OUT_DIR`; pass
alphabets the checkpoint never trained on (e.g. the proxy's held-out Balinese and Korean). Reads folders or zips
(`metaopt.tasks.omniglot`); writes the images' bytes unchanged.
"""
from __future__ import annotations

import argparse
import random
import zipfile
from collections import defaultdict
from pathlib import Path

from metaopt.tasks.omniglot import _entries, _sources

WAYS = 20


def make_runs(root: Path, out: Path, alphabets: list[str], n_runs: int = 20, seed: int = 0) -> None:
    """Writes `n_runs` runs under `out` (run01/ ...); raises ValueError for an unknown alphabet or one with fewer than
    20 characters."""
    files: dict[str, dict[str, dict[int, tuple[Path, str]]]] = defaultdict(lambda: defaultdict(dict))
    for source in _sources(root):  # alphabet -> character -> drawer -> (source, member)
        for (alphabet, character, name), where in _entries(source).items():
            files[alphabet][character][int(name.removesuffix(".png").split("_")[-1])] = where
    for alphabet in alphabets:
        if len(files.get(alphabet, {})) < WAYS:
            raise ValueError(f"alphabet {alphabet!r} has {len(files.get(alphabet, {}))} characters under {root}, "
                             f"fewer than {WAYS}; known: {sorted(files)}")
    rng = random.Random(seed)
    for r in range(1, n_runs + 1):
        alphabet = alphabets[(r - 1) * len(alphabets) // n_runs]
        characters = rng.sample(sorted(files[alphabet]), WAYS)
        drawers = set.intersection(*(set(files[alphabet][c]) for c in characters))  # all 20 in Omniglot
        trainer, tester = rng.sample(sorted(drawers), 2)
        order = list(range(WAYS))
        rng.shuffle(order)
        run = out / f"run{r:02d}"
        (run / "training").mkdir(parents=True, exist_ok=True)
        (run / "test").mkdir(exist_ok=True)
        for c, character in enumerate(characters):
            (run / "training" / f"class{c + 1:02d}.png").write_bytes(_read(files[alphabet][character][trainer]))
        lines = []
        for i, c in enumerate(order):
            (run / "test" / f"item{i + 1:02d}.png").write_bytes(_read(files[alphabet][characters[c]][tester]))
            lines.append(f"run{r:02d}/test/item{i + 1:02d}.png run{r:02d}/training/class{c + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def _read(where: tuple[Path, str]) -> bytes:
    source, member = where
    if source.suffix == ".zip":
        with zipfile.ZipFile(source) as archive:
            return archive.read(member)
    return Path(member).read_bytes()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="Omniglot's images_* folders or zips (data.root)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--alphabets", nargs="+", required=True)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_runs(args.root, args.out, args.alphabets, args.runs, args.seed)
    print(f"{args.runs} runs -> {args.out}")


if __name__ == "__main__":
    main()
