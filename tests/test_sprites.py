"""The sprite world: rendering, parsing, the action grammar, trajectories and the split writer."""

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from datamodules import sprites
from datamodules.sprites import (
    COLOURS,
    DIRECTIONS,
    MANIFEST,
    PALETTE,
    SHAPES,
    Sprite,
    SpriteState,
    action_type,
    apply,
    is_valid,
    main,
    parse,
    random_state,
    random_trajectory,
    render,
    shape_mask,
    valid_actions,
)
from datamodules.trajectory import SpriteDataModule, TrajectoryDataModule


def _all_actions(grid: int = 4) -> list[str]:
    """Every string the grammar can produce, valid or not."""
    acts = []
    for c in COLOURS:
        for s in SHAPES:
            acts += [f"move the {c} {s} {d}" for d in DIRECTIONS]
            acts += [f"paint the {c} {s} {n}" for n in COLOURS]
            acts.append(f"remove the {c} {s}")
            acts += [f"add a {c} {s} at row {r} column {k}" for r in range(1, grid + 1) for k in range(1, grid + 1)]
    return acts


def test_state_is_canonical_and_hashable() -> None:
    a, b = Sprite("red", "circle", 0, 1), Sprite("blue", "square", 2, 2)
    assert SpriteState((a, b)) == SpriteState((b, a))
    assert len({SpriteState((a, b)), SpriteState((b, a))}) == 1
    assert SpriteState.from_json(json.dumps(SpriteState((a, b)).to_json())) == SpriteState((a, b))


def test_is_valid() -> None:
    assert is_valid(SpriteState((Sprite("red", "circle", 0, 0),)))
    assert not is_valid(SpriteState(()))
    assert not is_valid(SpriteState((Sprite("red", "circle", 0, 0), Sprite("red", "circle", 1, 1))))
    assert not is_valid(SpriteState((Sprite("red", "circle", 0, 0), Sprite("blue", "circle", 0, 0))))
    assert not is_valid(SpriteState((Sprite("red", "circle", 4, 0),)))
    assert not is_valid(SpriteState(tuple(Sprite(c, "square", i, 0) for i, c in enumerate(COLOURS))))


def test_render_is_pixel_exact() -> None:
    image = render(SpriteState((Sprite("red", "square", 0, 0), Sprite("yellow", "triangle", 3, 3))))
    arr = np.asarray(image)
    assert image.mode == "RGB" and arr.shape == (32, 32, 3)
    colours = {tuple(p) for p in arr.reshape(-1, 3)}
    assert colours == {(0, 0, 0), PALETTE["red"], PALETTE["yellow"]}
    assert (arr[:8, :8] == PALETTE["red"]).all(axis=-1).sum() == 36  # 6×6 inside a 1-px margin
    assert shape_mask("circle").sum() == shape_mask("triangle").sum() == 24
    assert not shape_mask("triangle")[0].any() and not shape_mask("circle")[:, -1].any()
    assert render(SpriteState((Sprite("blue", "circle", 1, 1),)), cell=16).size == (64, 64)


def test_parse_inverts_render() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        state = random_state(rng)
        assert parse(render(state)) == state


def test_parse_accepts_arrays_tensors_and_other_sizes() -> None:
    state = random_state(random.Random(1))
    image = render(state)
    arr = np.array(image)
    assert parse(arr) == state
    assert parse(torch.from_numpy(arr).permute(2, 0, 1).float() / 255) == state
    assert parse(arr.astype(np.float32) / 255) == state
    assert parse(image.resize((64, 64), Image.Resampling.BICUBIC)) == state
    assert parse(render(state, cell=16)) == state
    assert parse(np.zeros((32, 32, 3), np.uint8)) == SpriteState(())


def test_parse_is_robust_to_noise_and_blur() -> None:
    rng, np_rng = random.Random(2), np.random.default_rng(2)
    states = [random_state(rng) for _ in range(300)]
    correct = 0
    for state in states:
        blurred = np.asarray(render(state).filter(ImageFilter.GaussianBlur(0.6)), dtype=np.float32) / 255
        noisy = np.clip(blurred + np_rng.normal(0, 0.05, blurred.shape), 0, 1)
        correct += parse(noisy) == state
    assert correct / len(states) >= 0.95


def test_parse_keeps_duplicates() -> None:
    canvas = np.zeros((32, 32, 3), np.uint8)
    one = np.asarray(render(SpriteState((Sprite("green", "circle", 0, 0),))))
    canvas[:8, :8] = canvas[8:16, 8:16] = one[:8, :8]
    state = parse(canvas)
    assert len(state.objects) == 2 and not is_valid(state)


def test_valid_actions_are_exactly_the_applicable_ones() -> None:
    rng = random.Random(3)
    universe = _all_actions()
    for _ in range(100):
        state = random_state(rng)
        valid = valid_actions(state)
        assert set(valid) == {a for a in universe if apply(state, a) is not None}
        for action in valid:
            nxt = apply(state, action)
            assert nxt != state and is_valid(nxt)


def test_invalid_actions_give_none() -> None:
    one = SpriteState((Sprite("red", "circle", 0, 0),))
    full = SpriteState((Sprite("red", "circle", 0, 0), Sprite("blue", "square", 0, 1), Sprite("green", "circle", 3, 3)))
    assert apply(one, "make it nicer") is None
    assert apply(one, "move the blue circle down") is None  # absent
    assert apply(one, "move the red circle up") is None  # off the grid
    assert apply(full, "move the red circle right") is None  # occupied
    assert apply(one, "paint the red circle red") is None
    assert apply(full, "paint the red circle green") is None  # green circle exists
    assert apply(one, "remove the red circle") is None  # last object
    assert apply(one, "add a blue square at row 1 column 1") is None  # occupied
    assert apply(one, "add a red circle at row 2 column 2") is None  # pair present
    assert apply(full, "add a yellow square at row 3 column 3") is None  # a 4th object
    assert apply(one, "add a blue square at row 5 column 1") is None


def test_apply_semantics_and_wording() -> None:
    state = SpriteState((Sprite("red", "circle", 1, 1),))
    assert apply(state, "move the red circle left") == SpriteState((Sprite("red", "circle", 1, 0),))
    assert apply(state, "Move the red circle down.") == SpriteState((Sprite("red", "circle", 2, 1),))
    assert apply(state, "paint the red circle blue") == SpriteState((Sprite("blue", "circle", 1, 1),))
    added = apply(state, "add a green triangle at row 1 column 4")
    assert added == SpriteState((Sprite("red", "circle", 1, 1), Sprite("green", "triangle", 0, 3)))
    assert apply(added, "remove the red circle") == SpriteState((Sprite("green", "triangle", 0, 3),))
    assert action_type("paint the red circle blue") == "paint" and action_type("jump") is None


def test_random_trajectories_are_valid_chains_with_balanced_types() -> None:
    rng = random.Random(4)
    types = []
    for _ in range(500):
        states, actions = random_trajectory(rng, 5)
        assert len(states) == 5 and len(actions) == 4
        for before, action, after in zip(states, actions, states[1:]):
            assert is_valid(before) and apply(before, action) == after
        types += [action_type(a) for a in actions]
    share = {t: types.count(t) / len(types) for t in set(types)}
    assert set(share) == {"move", "paint", "remove", "add"}
    assert max(share.values()) < 0.4  # adds (many instances) do not dominate
    with pytest.raises(ValueError):
        random_trajectory(rng, 1)


def _read_split(folder: Path) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, name = member.name.split(".", 1)
                samples.setdefault(key, {})[name] = tar.extractfile(member).read()
    return list(samples.values())


def test_cli_writes_four_disjoint_splits(tmp_path: Path) -> None:
    argv = ["--out", str(tmp_path), "--seed", "5", "--labelled", "12", "--unlabelled", "30", "--val", "7"]
    main([*argv, "--test", "9", "--length", "3", "--test-length", "5", "--shard-size", "10"])
    counts = {"labelled": 12, "unlabelled": 30, "val": 7, "test": 9}
    sequences = {}
    for split, n in counts.items():
        assert len(list((tmp_path / split).glob("*.tar"))) == -(-n // 10)
        samples = _read_split(tmp_path / split)
        assert len(samples) == n
        length = 5 if split == "test" else 3
        seqs = set()
        for sample in samples:
            meta, actions = json.loads(sample["meta.json"]), json.loads(sample["actions.json"])
            assert meta["source"] == "sprites" and len(meta["states"]) == length and len(actions) == length - 1
            assert meta["task"] in ("move", "paint", "remove", "add", "mixed")
            states = [SpriteState.from_json(s) for s in meta["states"]]
            assert all(apply(s, a) == t for s, a, t in zip(states, actions, states[1:]))
            assert parse(Image.open(io.BytesIO(sample["0.png"]))) == states[0]
            seqs.add(tuple(states))
        sequences[split] = seqs
    splits = list(sequences)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not sequences[a] & sequences[b]
    assert not list(tmp_path.rglob("*.tmp"))


def test_cli_writes_its_manifest_last_and_a_killed_run_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "world"
    argv = [
        "--out",
        str(out),
        "--labelled",
        "4",
        "--unlabelled",
        "12",
        "--val",
        "2",
        "--test",
        "2",
        "--shard-size",
        "4",
    ]
    main(argv)
    data = SpriteDataModule.from_folder(out)  # the manifest is there, with the settings used
    assert data.generation["unlabelled"] == 12 and data._is_complete(out / MANIFEST)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    draw, calls = sprites.render, []

    def killed_midway(*args: object, **kwargs: object) -> Image.Image:
        calls.append(1)
        if len(calls) > 40:  # within the unlabelled split: test, val and labelled are complete by then
            raise KeyboardInterrupt
        return draw(*args, **kwargs)

    monkeypatch.setattr(sprites, "render", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        main([*argv, "--seed", "1"])
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    calls.clear()
    with pytest.raises(KeyboardInterrupt):  # into a fresh folder: no partial set for a DataModule to take
        main([*argv[2:], "--out", str(tmp_path / "fresh")])
    with pytest.raises(FileNotFoundError, match="matches no shard"):
        TrajectoryDataModule(str(tmp_path / "fresh")).setup("fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["world"]
