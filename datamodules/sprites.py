"""The sprite world: a tiny procedurally generated visual world with exact ground truth.

States are 1–3 coloured shapes on a 4×4 grid of 8-px cells (a 32×32 RGB canvas, black background).
``render`` draws a state pixel-exactly, ``parse`` reads a state back from any image (rendered or generated),
``apply`` executes a plain-English action, and ``write_sprite_splits`` writes the four shard splits.

    python -m datamodules.sprites --out data/sprites --seed 0

The splits and their manifest (``sprites-manifest.json``, the generation settings and shard list) are written
into a staging folder that replaces ``--out`` only when complete, so a killed run leaves the earlier set intact.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .shards import Trajectory, staged_folder, write_shards

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
ACTION_TYPES = ("move", "paint", "remove", "add")
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}
GRID = 4
CELL = 8
MAX_OBJECTS = 3

_C = "|".join(COLOURS)
_S = "|".join(SHAPES)
_ACTION_PATTERNS = {
    "move": re.compile(rf"move the ({_C}) ({_S}) (left|right|up|down)"),
    "paint": re.compile(rf"paint the ({_C}) ({_S}) ({_C})"),
    "remove": re.compile(rf"remove the ({_C}) ({_S})"),
    "add": re.compile(rf"add an? ({_C}) ({_S}) at row (\d+) column (\d+)"),
}


@dataclass(frozen=True, order=True)
class Sprite:
    """One object; ``row``/``col`` are 0-indexed grid coordinates."""

    colour: str
    shape: str
    row: int
    col: int

    def to_json(self) -> dict[str, Any]:
        return {"colour": self.colour, "shape": self.shape, "row": self.row, "col": self.col}


@dataclass(frozen=True)
class SpriteState:
    """A set of sprites, kept sorted so that ``==`` and ``hash`` are semantic.

    May hold invalid configurations (duplicates from a noisy parse); ``is_valid`` checks the world's rules.
    """

    objects: tuple[Sprite, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(sorted(self.objects, key=_sort_key)))

    def find(self, colour: str, shape: str) -> Sprite | None:
        """The object with this (colour, shape), if present."""
        return next((o for o in self.objects if o.colour == colour and o.shape == shape), None)

    def occupied(self) -> set[tuple[int, int]]:
        return {(o.row, o.col) for o in self.objects}

    def to_json(self) -> list[dict[str, Any]]:
        return [o.to_json() for o in self.objects]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]] | str) -> SpriteState:
        """Inverse of ``to_json``; also accepts the JSON string."""
        if isinstance(data, str):
            data = json.loads(data)
        return cls(tuple(Sprite(str(o["colour"]), str(o["shape"]), int(o["row"]), int(o["col"])) for o in data))


def _sort_key(o: Sprite) -> tuple[int, int, str, str]:
    return (o.row, o.col, o.colour, o.shape)


def is_valid(state: SpriteState, grid: int = GRID) -> bool:
    """True when the state obeys the world's rules: 1–3 known objects, unique pairs and cells, on the grid."""
    objs = state.objects
    return (
        1 <= len(objs) <= MAX_OBJECTS
        and all(o.colour in COLOURS and o.shape in SHAPES and 0 <= o.row < grid and 0 <= o.col < grid for o in objs)
        and len({(o.colour, o.shape) for o in objs}) == len(objs)
        and len(state.occupied()) == len(objs)
    )


@cache
def shape_mask(shape: str, cell: int = CELL) -> np.ndarray:
    """Boolean (cell, cell) mask of a shape drawn inside a 1-px margin; pixel-exact, no antialiasing."""
    n = cell - 2
    c = (np.arange(n) + 0.5) / n  # pixel centres in [0, 1]
    v, u = np.meshgrid(c, c, indexing="ij")  # v: down, u: right
    if shape == "square":
        inner = np.ones((n, n), dtype=bool)
    elif shape == "circle":
        # radius 0.45 rather than 0.5 so the disk loses whole corner runs and stays distinct from the square
        inner = (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.45**2
    elif shape == "triangle":
        rows = (np.arange(n)[:, None] + 1) / n  # apex at the top, base spanning the bottom row
        inner = np.abs(u - 0.5) <= rows / 2 + 1e-9
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    mask = np.zeros((cell, cell), dtype=bool)
    mask[1:-1, 1:-1] = inner
    mask.setflags(write=False)
    return mask


def render(state: SpriteState, cell: int = CELL, grid: int = GRID) -> Image.Image:
    """Draw the state as an RGB image of (grid·cell)² pixels on a black background."""
    canvas = np.zeros((grid * cell, grid * cell, 3), dtype=np.uint8)
    for o in state.objects:
        block = canvas[o.row * cell : (o.row + 1) * cell, o.col * cell : (o.col + 1) * cell]
        block[shape_mask(o.shape, cell)] = PALETTE[o.colour]
    return Image.fromarray(canvas, mode="RGB")


def _to_float_hwc(image: Any) -> np.ndarray:
    """PIL image, uint8 HWC array, or float CHW/HWC array/tensor in [0, 1] → float32 (H, W, 3) in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if hasattr(image, "detach"):  # torch tensor, without importing torch here
        image = image.detach().float().cpu().numpy()
    arr = np.asarray(image)
    if arr.ndim != 3:
        raise ValueError(f"expected a 3-D image, got shape {arr.shape}")
    if arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else arr.astype(np.float32)
    return np.clip(arr, 0.0, 1.0)


def parse(image: Any, grid: int = GRID, cell: int = CELL, min_fill: float = 0.5) -> SpriteState:
    """Read the state shown in an image (rendered or generated; any size, resampled to grid·cell first).

    A cell holds an object only if at least ``min_fill`` × (smallest shape area) of its pixels are bright
    (max channel > 0.5, the background being black). Colour = palette colour nearest to the mean bright
    pixel; shape = template nearest in L1 to the cell's soft mask. Duplicates are kept, not repaired.
    """
    arr = _to_float_hwc(image)
    size = grid * cell
    if arr.shape[:2] != (size, size):
        # box filter: averaging is the faithful inverse of an upsampled render
        pil = Image.fromarray((arr * 255.0 + 0.5).astype(np.uint8), mode="RGB")
        arr = np.asarray(pil.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0
    templates = {s: shape_mask(s, cell).astype(np.float32) for s in SHAPES}
    min_pixels = min_fill * min(t.sum() for t in templates.values())
    palette = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32) / 255.0
    objects = []
    for row in range(grid):
        for col in range(grid):
            block = arr[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell]
            soft = block.max(axis=-1)
            fg = soft > 0.5
            if fg.sum() < min_pixels:
                continue
            mean = block[fg].mean(axis=0)
            colour = COLOURS[int(np.argmin(((palette - mean) ** 2).sum(axis=1)))]
            shape = min(SHAPES, key=lambda s: float(np.abs(soft - templates[s]).sum()))
            objects.append(Sprite(colour, shape, row, col))
    return SpriteState(tuple(objects))


def action_type(action: str) -> str | None:
    """``"move"``, ``"paint"``, ``"remove"`` or ``"add"`` when the text parses, else None."""
    text = action.strip().lower().rstrip(".")
    return next((t for t, p in _ACTION_PATTERNS.items() if p.fullmatch(text)), None)


def apply(state: SpriteState, action: str, grid: int = GRID) -> SpriteState | None:
    """The state after ``action``; None when the text does not parse or the action is invalid here."""
    text = " ".join(action.strip().lower().rstrip(".").split())
    for kind, pattern in _ACTION_PATTERNS.items():
        m = pattern.fullmatch(text)
        if m:
            return _APPLY[kind](state, m.groups(), grid)
    return None


def _without(state: SpriteState, obj: Sprite) -> tuple[Sprite, ...]:
    return tuple(o for o in state.objects if o != obj)


def _apply_move(state: SpriteState, args: tuple[str, ...], grid: int) -> SpriteState | None:
    colour, shape, direction = args
    obj = state.find(colour, shape)
    if obj is None:
        return None
    dr, dc = DIRECTIONS[direction]
    row, col = obj.row + dr, obj.col + dc
    if not (0 <= row < grid and 0 <= col < grid) or (row, col) in state.occupied():
        return None
    return SpriteState((*_without(state, obj), Sprite(colour, shape, row, col)))


def _apply_paint(state: SpriteState, args: tuple[str, ...], grid: int) -> SpriteState | None:
    colour, shape, new_colour = args
    obj = state.find(colour, shape)
    if obj is None or new_colour == colour or state.find(new_colour, shape) is not None:
        return None
    return SpriteState((*_without(state, obj), Sprite(new_colour, shape, obj.row, obj.col)))


def _apply_remove(state: SpriteState, args: tuple[str, ...], grid: int) -> SpriteState | None:
    obj = state.find(*args)
    if obj is None or len(state.objects) <= 1:
        return None
    return SpriteState(_without(state, obj))


def _apply_add(state: SpriteState, args: tuple[str, ...], grid: int) -> SpriteState | None:
    colour, shape, r, c = args
    row, col = int(r) - 1, int(c) - 1  # text is 1-indexed
    if (
        not (0 <= row < grid and 0 <= col < grid)
        or (row, col) in state.occupied()
        or state.find(colour, shape) is not None
        or len(state.objects) >= MAX_OBJECTS
    ):
        return None
    return SpriteState((*state.objects, Sprite(colour, shape, row, col)))


_APPLY = {"move": _apply_move, "paint": _apply_paint, "remove": _apply_remove, "add": _apply_add}


def valid_actions_by_type(state: SpriteState, grid: int = GRID) -> dict[str, list[str]]:
    """Every valid action in ``state``, grouped by action type (types with none are omitted)."""
    candidates: dict[str, list[str]] = {t: [] for t in ACTION_TYPES}
    for o in state.objects:
        candidates["move"] += [f"move the {o.colour} {o.shape} {d}" for d in DIRECTIONS]
        candidates["paint"] += [f"paint the {o.colour} {o.shape} {c}" for c in COLOURS]
        candidates["remove"].append(f"remove the {o.colour} {o.shape}")
    out = {t: [a for a in acts if apply(state, a, grid) is not None] for t, acts in candidates.items()}
    if len(state.objects) < MAX_OBJECTS:  # adds enumerated directly: there are up to 192 of them
        taken, pairs = state.occupied(), {(o.colour, o.shape) for o in state.objects}
        out["add"] = [
            f"add a {c} {s} at row {r + 1} column {k + 1}"
            for r in range(grid)
            for k in range(grid)
            if (r, k) not in taken
            for c in COLOURS
            for s in SHAPES
            if (c, s) not in pairs
        ]
    return {t: acts for t, acts in out.items() if acts}


def valid_actions(state: SpriteState, grid: int = GRID) -> list[str]:
    """Every valid action in ``state``."""
    return [a for acts in valid_actions_by_type(state, grid).values() for a in acts]


def random_state(rng: random.Random, grid: int = GRID) -> SpriteState:
    """A uniformly random valid state with 1–3 objects."""
    n = rng.randint(1, MAX_OBJECTS)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    cells = rng.sample(range(grid * grid), n)
    return SpriteState(tuple(Sprite(c, s, k // grid, k % grid) for (c, s), k in zip(pairs, cells)))


def random_trajectory(rng: random.Random, length: int, grid: int = GRID) -> tuple[list[SpriteState], list[str]]:
    """``length`` states linked by ``length - 1`` valid actions.

    The action type is drawn uniformly among the types valid in the current state, then an instance,
    so that the many possible adds do not dominate.
    """
    if length < 2:
        raise ValueError(f"a trajectory needs at least 2 states, got length={length}")
    states, actions = [random_state(rng, grid)], []
    for _ in range(length - 1):
        by_type = valid_actions_by_type(states[-1], grid)
        action = rng.choice(by_type[rng.choice(sorted(by_type))])
        actions.append(action)
        states.append(apply(states[-1], action, grid))
    return states, actions


SPLITS = ("test", "val", "labelled", "unlabelled")  # generation order: eval splits first, so they never change
MANIFEST = "sprites-manifest.json"


def _split_trajectories(
    split: str, count: int, length: int, seed: int, seen: set[tuple[SpriteState, ...]]
) -> Iterator[Trajectory]:
    rng = random.Random(f"sprites-{seed}-{split}")  # one stream per split: sizes of one split never shift another
    made = 0
    while made < count:
        states, actions = random_trajectory(rng, length)
        if tuple(states) in seen:  # splits never share a trajectory
            continue
        seen.add(tuple(states))
        types = [action_type(a) for a in actions]
        meta = {
            "task": types[0] if len(set(types)) == 1 else "mixed",
            "tasks": types,
            "source": "sprites",
            "states": [s.to_json() for s in states],
        }
        yield Trajectory(f"sprites-{split}-{made:06d}", [render(s) for s in states], list(actions), meta)
        made += 1


def write_sprite_splits(
    out: str | Path,
    seed: int = 0,
    labelled: int = 1500,
    unlabelled: int = 15000,
    val: int = 100,
    test: int = 200,
    length: int = 3,
    test_length: int = 6,
    shard_size: int = 500,
) -> None:
    """Write ``out/{labelled,unlabelled,val,test}/sprites-*.tar`` and, last, ``out/sprites-manifest.json``.

    ``length``/``test_length`` count states. ``meta.json`` holds ``task`` (the action type, or ``"mixed"``),
    per-step ``tasks``, ``source`` and the ground-truth ``states``. The unlabelled split keeps its true actions;
    readers ignore them. The manifest records the settings and each split's shard names and sizes in bytes.
    ``out`` is replaced only once everything is written (other entries in it are kept).
    """
    counts = {"test": test, "val": val, "labelled": labelled, "unlabelled": unlabelled}
    lengths = {"test": test_length, "val": length, "labelled": length, "unlabelled": length}
    settings = {"seed": seed, **{s: counts[s] for s in ("labelled", "unlabelled", "val", "test")}}
    settings |= {"length": length, "test_length": test_length, "shard_size": shard_size}
    seen: set[tuple[SpriteState, ...]] = set()
    shards: dict[str, list[Path]] = {}
    with staged_folder(out, replaces=[*SPLITS, MANIFEST]) as stage:
        with tqdm(total=sum(counts.values()), desc="sprites", unit="traj") as bar:
            for split in SPLITS:
                trajs = _progress(_split_trajectories(split, counts[split], lengths[split], seed, seen), bar)
                shards[split] = write_shards(trajs, stage / split, prefix="sprites", shard_size=shard_size)
        manifest = {"generator": "datamodules.sprites", **settings}
        manifest["shards"] = {s: [p.name for p in shards[s]] for s in SPLITS}
        manifest["bytes"] = {s: [p.stat().st_size for p in shards[s]] for s in SPLITS}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _progress(items: Iterator[Trajectory], bar: tqdm) -> Iterator[Trajectory]:
    for item in items:
        yield item
        bar.update(1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m datamodules.sprites", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder; gets labelled/ unlabelled/ val/ test/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--labelled", type=int, default=1500, help="action-labelled trajectories (SFT)")
    p.add_argument("--unlabelled", type=int, default=15000, help="state-only trajectories (SWIRL)")
    p.add_argument("--val", type=int, default=100)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--length", type=int, default=3, help="states per trajectory in labelled/unlabelled/val")
    p.add_argument("--test-length", type=int, default=6, help="states per test trajectory (multi-turn)")
    p.add_argument("--shard-size", type=int, default=500, help="trajectories per tar")
    a = p.parse_args(argv)
    write_sprite_splits(a.out, a.seed, a.labelled, a.unlabelled, a.val, a.test, a.length, a.test_length, a.shard_size)


if __name__ == "__main__":
    main()
