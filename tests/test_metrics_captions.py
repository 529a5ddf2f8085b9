"""Caption following (codi_jax/metrics/captions.py): the caption parser against the scene graph, the scores against
hand-made label maps with known answers, and the shipped colour segmenter against chance on held-out scenes."""

import json

import numpy as np
import pytest

from codi_jax.data import scenes
from codi_jax.metrics import MetricUnavailable, captions, depth
from codi_jax.metrics.train_segmenter import render_labels
from codi_jax.weights.convert import WeightsMismatchError

RED, BLUE, GREEN = (1 + scenes.COLOURS.index(c) for c in ("red", "blue", "green"))


def test_parse_recovers_every_object_and_relation_of_the_scene_graph():
    for i in range(150):
        scene = scenes.sample_scene(0, i, "test")
        parsed = captions.parse(scenes.caption(scene))
        assert sorted(parsed.objects) == sorted((o.colour, o.shape) for o in scene.objects)
        assert len(parsed.relations) == len(scene.objects) - 1
        assert all(rel in scenes.RELATIONS for _, rel, _ in parsed.relations)
    with pytest.raises(ValueError, match="not a scene caption.*a photo of a cat"):
        captions.parse("a photo of a cat")


def _blobs(*placed):
    """A 32x32 label map with 6x6 blobs: (label, column of the blob's left edge)."""
    lab = np.zeros((32, 32), np.int32)
    for label, x in placed:
        lab[12:18, x:x + 6] = label
    return lab


def test_scores_of_known_label_maps():
    red_left_blue_right = _blobs((RED, 2), (BLUE, 24))
    labels = np.stack([red_left_blue_right] * 4 + [_blobs((RED, 2), (BLUE, 24), (GREEN, 12)), _blobs((RED, 2))])
    texts = ["a red sphere left of a shiny blue box",  # all right
             "a red sphere right of a shiny blue box",  # colours right, place wrong
             "a blue box left of a red sphere",  # the same, the other way round
             "a red sphere left of a blue box, and a green cylinder right of the blue box",  # green missing
             "a red sphere left of a blue box",  # an extra green object
             "a red sphere left of a blue box"]  # blue missing: the relation cannot hold
    got = captions.caption_following(labels, texts)
    np.testing.assert_array_equal(got["colour_recall"], [1, 1, 1, 2 / 3, 1, 0.5])
    np.testing.assert_array_equal(got["colour_exact"], [1, 1, 1, 0, 0, 0])
    # One outcome per left/right relation: the 4th caption has two (red-blue holds, green-blue misses green).
    np.testing.assert_array_equal(got["relation"], [1, 0, 0, 1, 0, 1, 0])
    # order keeps the relations whose two colours were found: not green-blue of the 4th, nor the 6th's.
    np.testing.assert_array_equal(got["order"], [1, 0, 0, 1, 1])


def test_small_specks_and_repeated_colours():
    speck = _blobs((RED, 2))
    speck[0, 0:4] = BLUE  # 4 pixels < 0.5 % of 1024: not an object
    got = captions.caption_following(speck[None], ["a red sphere left of a blue box"])
    assert got["colour_recall"][0] == 0.5 and got["relation"].tolist() == [0.0] and got["order"].size == 0
    # Two objects of one colour: their colour cannot place them, so the relation is not scored.
    same = captions.caption_following(_blobs((RED, 2), (RED, 24))[None], ["a red sphere left of a red box"])
    assert same["colour_recall"][0] == 1 and same["relation"].size == 0
    with pytest.raises(ValueError, match="one caption per image"):
        captions.caption_following(np.zeros((2, 8, 8), np.int32), ["a red sphere"])
    with pytest.raises(ValueError, match="labels must lie in"):
        captions.caption_following(np.full((1, 8, 8), len(captions.CLASSES)), ["a red sphere"])


@pytest.fixture(scope="module")
def held_out():
    return render_labels("test", 0, 48, 32)


def test_exact_labels_of_real_scenes_follow_their_captions(held_out):
    """The rules themselves: the renderer's exact labels score (nearly) perfectly, shuffled captions do not."""
    _, labels, texts = held_out
    own = captions.caption_following(labels, texts)
    assert own["colour_recall"].min() == 1 and own["colour_exact"].min() == 1
    assert own["relation"].mean() >= 0.95  # a centroid of the visible part can cross a partly hidden neighbour's
    # Mirrored scenes: the same objects, every left/right swapped. Colours still count, order reads the places.
    mirrored = captions.caption_following(labels[:, :, ::-1], texts)
    assert mirrored["colour_recall"].min() == 1 and mirrored["order"].size == own["order"].size >= 15
    assert own["order"].mean() >= 0.95 and mirrored["order"].mean() <= 0.05
    chance = captions.caption_following(labels, texts[1:] + texts[:1])
    assert chance["colour_recall"].mean() < 0.5 and chance["colour_exact"].mean() < 0.2


def test_shipped_segmenter_reads_the_captions_of_held_out_scenes(held_out):
    images, labels, texts = held_out
    model = captions.load_segmenter()  # the shipped weights; a missing file fails here, it is not skipped
    pred = captions.segment(model, images)
    assert pred.shape == labels.shape and pred.dtype == np.int32
    objects = labels > 0
    assert np.mean(pred[objects] == labels[objects]) > 0.8
    own = captions.caption_following(pred, texts)
    chance = captions.caption_following(pred, texts[1:] + texts[:1])
    assert own["colour_recall"].mean() > 0.9 > 0.5 > chance["colour_recall"].mean()
    assert own["relation"].mean() > 0.8


def test_a_depth_estimator_is_not_a_segmenter(tmp_path):
    with pytest.raises(WeightsMismatchError, match="'tanh'-head network, but caption following needs a 'logits'"):
        captions.load_segmenter(depth.DEFAULT_PATH)
    with pytest.raises(MetricUnavailable, match="caption following: no reader .*train_segmenter --out"):
        captions.load_segmenter(tmp_path)
    config = json.loads((captions.DEFAULT_PATH / "config.json").read_text())
    assert config["head"] == "logits" and config["out_channels"] == len(captions.CLASSES)


def _tool(name: str):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def test_vae_colours_tool_reads_real_and_reconstructed_scenes(tmp_path):
    tool = _tool("vae_colours")
    out = tmp_path / "vae.png"
    result = tool.main(["--examples", "8", "--rows", "2", "--out", str(out)])
    assert result["examples"] == 8 and result["colour_recall_real"] >= 0.9
    assert 0 <= result["colour_recall_vae"] <= 1 and out.is_file()


def test_teacher_captions_tool_scores_each_guidance_scale(tmp_path):
    from PIL import Image

    out = tmp_path / "teacher.png"
    result = _tool("teacher_captions").main(["--examples", "6", "--steps", "2", "--guidance", "1,3", "--rows", "2",
                                             "--out", str(out)])
    assert result["examples"] == 6
    for w in ("1", "3"):
        scores = result[f"guidance {w}"]
        lo, hi = scores["colour_recall_ci"]
        assert 0 <= lo <= scores["colour_recall"] <= hi <= 1 and 0 <= scores["colour_exact"] <= 1
    assert Image.open(out).size == (3 * 32 * 3, 2 * 32 * 3)  # two scales and the real scene, two rows, 3x
