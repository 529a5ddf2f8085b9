"""Image folders (with bad files), the tfds array_record builder, and the prepare_depth command."""

import hashlib
import json
import logging
import os

import grain
import numpy as np
import pytest
from PIL import Image

from codi_jax import data
from codi_jax.data import contact_sheet, prepare_depth, scenes, scenes_tfds, sources


def _write_images(folder, n, size=(40, 48), captions=True, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        img = scenes.render_example(1, i, "train", 48)["image"][: size[0], : size[1]]
        Image.fromarray(img).save(folder / f"img{i:02d}.png")
        if captions:
            (folder / f"img{i:02d}.txt").write_text(f"caption {i}\n")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    _write_images(root / "train", 6)
    _write_images(root / "test", 2, start=6)
    # A truncated PNG and a file that is not an image at all.
    good = (root / "train" / "img00.png").read_bytes()
    (root / "train" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "train" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    return root


def _folder_cfg(root, **kw):
    cfg = data.default_config()
    cfg.update({"dataset": "folder", "data_dir": str(root), "task": "t2i", "image_size": 16, **kw})
    return cfg


def test_folder_source_reads_images_and_captions(image_folder):
    src = sources.FolderSource(str(image_folder), split="train", image_size=16)
    assert isinstance(src, grain.sources.RandomAccessDataSource) and len(src) == 8
    rec = src[src.files.index(os.path.join("train", "img03.png"))]
    assert rec["image"].shape == (16, 16, 3) and rec["caption"] == "caption 3" and not rec["bad"]


def test_bad_files_are_skipped_counted_and_logged(image_folder, caplog):
    src = sources.FolderSource(str(image_folder), split="train", image_size=16)
    before = sources.skipped_count()
    with caplog.at_level(logging.WARNING):
        bad = [src[i]["bad"] for i in range(len(src))]
    assert sum(bad) == 2 and src.skipped == 2 and sources.skipped_count() == before + 2
    assert "truncated.png" in caplog.text and "garbage.jpg" in caplog.text
    validated = sources.FolderSource(str(image_folder), split="train", image_size=16, validate=True)
    assert len(validated) == 6 and validated.skipped == 2
    # The pipeline filters them: an epoch of 6 good records never yields an all-zero (bad) image.
    it = iter(data.make_train_loader(_folder_cfg(image_folder), global_batch_size=3, seed=0, process_index=0,
                                     process_count=1))
    imgs = np.concatenate([next(it)["image"] for _ in range(4)])
    assert (imgs.reshape(len(imgs), -1) != -1).any(axis=1).all()
    assert len({x.tobytes() for x in imgs}) == 6


def test_folder_errors_are_clear(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        sources.FolderSource(str(tmp_path / "empty"), split="train", image_size=16)
    with pytest.raises(ValueError, match="image_size"):
        data.validate(_bad_size(image_folder))
    with pytest.raises(ValueError, match="prepare_depth"):
        sources.FolderSource(str(image_folder), split="train", image_size=16, need_depth=True)
    meta = tmp_path / "meta"
    _write_images(meta, 2, captions=False)
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "img00.png", "prompt": "x"}) + "\n")
    with pytest.raises(ValueError, match="caption column 'text'"):
        sources.FolderSource(str(meta), split="train", image_size=16, test_fraction=0.0, validation_fraction=0.0)
    src = sources.FolderSource(str(meta), split="train", image_size=16, caption_key="prompt", test_fraction=0.0,
                               validation_fraction=0.0)
    assert src[src.files.index("img00.png")]["caption"] == "x"


def _bad_size(root):
    cfg = _folder_cfg(root)
    cfg.image_size = 20
    return cfg


def test_edit_folder_layout(tmp_path):
    for sub in ("input", "edited"):
        _write_images(tmp_path / sub, 3, captions=False)
    (tmp_path / "instruction").mkdir()
    for i in range(3):
        (tmp_path / "instruction" / f"img{i:02d}.txt").write_text(f"make it {i}")
    cfg = _folder_cfg(tmp_path, task="edit")
    src = sources.EditFolderSource(str(tmp_path), split="train", image_size=16, test_fraction=0.0,
                                   validation_fraction=0.0)
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    assert len(src) == 3 and src[1]["caption"] == "make it 1" and src[1]["input_image"].shape == (16, 16, 3)
    with pytest.raises(ValueError, match="instruction"):
        sources.EditFolderSource(str(tmp_path / "input"), split="train", image_size=16)
    assert data.cond_channels(cfg) == 3


NAMES = [f"img_{i:04d}.png" for i in range(400)] + [f"sub/dir/photo {i}.jpg" for i in range(200)]


def _touch(root, names):
    """Image files that are only listed, never decoded (the split is chosen from the paths alone)."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _digest(files):
    return hashlib.sha1("\n".join(n for n in NAMES if n in set(files)).encode()).hexdigest()


def test_folder_hash_split_keeps_test_and_carves_validation_beside_it(tmp_path):
    _touch(tmp_path, NAMES)
    split = {s: set(sources.FolderSource(str(tmp_path), split=s, image_size=16).files)
             for s in ("train", "validation", "test")}
    # The test files before validation existed (digest and count from that code, fraction 0.05): unchanged.
    assert len(split["test"]) == 41 and _digest(split["test"]) == "52939c178f614298b9ae2609723a9fb16c11853e"
    assert not split["validation"] & split["test"] and not split["validation"] & split["train"]
    assert split["train"] | split["validation"] | split["test"] == set(NAMES)
    assert 15 <= len(split["validation"]) <= 45  # 5 % of 600
    # Files added later never move a file from one split to another.
    _touch(tmp_path, [f"new_{i}.png" for i in range(300)])
    for s, files in split.items():
        after = set(sources.FolderSource(str(tmp_path), split=s, image_size=16).files)
        assert files <= after and not (after - files) - {f"new_{i}.png" for i in range(300)}


def test_folder_fractions_are_config_fields(tmp_path):
    _touch(tmp_path, NAMES)
    cfg = _folder_cfg(tmp_path, folder_test_fraction=0.10, folder_validation_fraction=0.2)
    test = data.make_source(cfg, "test").files
    assert len(test) == 61 and _digest(test) == "07e0a1d97bcf6cdc829e42e0242a6bb4d7571984"  # as before, at 10 %
    assert 90 <= len(data.make_source(cfg, "validation")) <= 150
    for field, value in [("folder_test_fraction", 1.0), ("folder_validation_fraction", -0.1),
                         ("folder_validation_fraction", 0.95)]:
        with pytest.raises(ValueError, match=field):
            data.validate(_folder_cfg(tmp_path, **{field: value}))


def test_folder_split_folders_with_and_without_validation(tmp_path):
    _touch(tmp_path, [f"train/{n}" for n in NAMES[:300]] + [f"test/t{i}.png" for i in range(5)])
    train = set(sources.FolderSource(str(tmp_path), split="train", image_size=16).files)
    test = set(sources.FolderSource(str(tmp_path), split="test", image_size=16).files)
    assert test == {f"test/t{i}.png" for i in range(5)}
    # No validation/ folder: train/ is used whole (a run on it trains on what it did before), and validation is
    # refused in one line saying what to add.
    assert train == {f"train/{n}" for n in NAMES[:300]}
    with pytest.raises(ValueError, match="no validation/ folder: add one"):
        sources.FolderSource(str(tmp_path), split="validation", image_size=16)
    _touch(tmp_path, [f"validation/v{i}.png" for i in range(3)])
    assert set(sources.FolderSource(str(tmp_path), split="validation", image_size=16).files) == \
        {f"validation/v{i}.png" for i in range(3)}
    assert len(sources.FolderSource(str(tmp_path), split="train", image_size=16)) == 300  # all of train/ again


def test_edit_folder_splits_are_disjoint(tmp_path):
    stems = [f"e{i:03d}" for i in range(200)]
    _touch(tmp_path, [f"{d}/{s}.png" for d in ("input", "edited") for s in stems])
    (tmp_path / "instruction").mkdir()
    for s in stems:
        (tmp_path / "instruction" / f"{s}.txt").write_text("make it red")
    split = {s: {i[1] for i in sources.EditFolderSource(str(tmp_path), split=s, image_size=16).items}
             for s in ("train", "validation", "test")}
    assert all(split.values()) and sum(map(len, split.values())) == 200
    assert not split["train"] & split["validation"] and not split["validation"] & split["test"]


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    name = scenes_tfds.prepare(str(d), image_size=16, num_train=12, num_test=4)
    return str(d), name


def test_tfds_builder_prepares_and_reads_back(tfds_dir):
    import tensorflow_datasets as tfds

    d, name = tfds_dir
    assert name == "codi_scenes/16px_12_4"
    assert any(f.endswith(".array_record-00000-of-00001") for f in os.listdir(os.path.join(d, name, "1.0.0")))
    ds = tfds.data_source(name, split="train", data_dir=d)
    assert len(ds) == 12 and len(tfds.data_source(name, split="test", data_dir=d)) == 4
    ref = scenes.render_example(0, 5, "train", 16, edit=True)
    rec = ds[5]
    np.testing.assert_array_equal(rec["image"], ref["input_image"])
    np.testing.assert_array_equal(rec["edited_image"], ref["image"])
    np.testing.assert_array_equal(rec["depth"], ref["depth"])
    assert rec["caption"].decode() == ref["caption"] and rec["instruction"].decode() == ref["instruction"]


def test_tfds_pipeline_and_missing_feature(tfds_dir):
    d, name = tfds_dir
    cfg = data.default_config()
    cfg.update(dataset="tfds", tfds_name=name, data_dir=d, image_size=16, task="depth")
    b = next(iter(data.make_train_loader(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)))
    assert b["cond"].shape == (4, 16, 16, 1) and b["input_ids"].shape == (4, 77)
    cfg.update(task="edit", tfds_image_key="edited_image", tfds_caption_key="instruction", tfds_edit_input_key="image")
    (e,) = data.make_eval_batches(cfg, batch_size=4, num_examples=4, seed=0)
    assert all(c.startswith("make the") for c in e["caption"]) and e["cond"].shape == (4, 16, 16, 3)
    cfg.tfds_caption_key = "text"
    with pytest.raises(ValueError, match="text"):
        data.make_train_loader(cfg, global_batch_size=4, seed=0, process_index=0, process_count=1)


def test_tfds_validation_split_is_named_in_the_config(tfds_dir):
    d, name = tfds_dir
    cfg = data.default_config()
    cfg.update(dataset="tfds", tfds_name=name, data_dir=d, image_size=16, task="t2i")
    with pytest.raises(ValueError, match="has no split 'validation'"):  # this dataset has train and test only
        data.make_source(cfg, "validation")
    cfg.tfds_validation_split = "train"  # any split of the dataset, by name
    assert len(data.make_source(cfg, "validation")) == 12 and len(data.make_source(cfg, "test")) == 4


@pytest.fixture(scope="module")
def tiny_depth_model(tmp_path_factory):
    prepare_depth._hide_broken_torchvision()
    import torch
    from transformers import GLPNConfig, GLPNForDepthEstimation
    from transformers.models.glpn.image_processing_pil_glpn import GLPNImageProcessorPil

    torch.manual_seed(0)
    cfg = GLPNConfig(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                     patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                     decoder_hidden_size=8, max_depth=10, head_in_index=-1)
    path = tmp_path_factory.mktemp("glpn")
    GLPNForDepthEstimation(cfg).eval().save_pretrained(path)
    GLPNImageProcessorPil().save_pretrained(path)
    assert (path / "model.safetensors").exists()
    return str(path)


def test_prepare_depth_with_a_tiny_model(tmp_path, tiny_depth_model):
    from transformers import AutoImageProcessor, pipeline

    images = tmp_path / "imgs"
    _write_images(images / "train", 2)
    _write_images(images / "test", 1, start=2)
    (images / "train" / "broken.png").write_bytes(b"\x89PNG broken")
    stats = prepare_depth.prepare_depth(str(images), tiny_depth_model)
    assert stats == {"written": 3, "skipped": 1}
    out = images / "depth" / "train" / "img01.png"
    written = np.asarray(Image.open(out))
    assert written.shape == (40, 48) and written.dtype == np.uint16
    assert written.min() == 0 and written.max() == 65535
    # GLPN predicts metric depth, so the map is its inverse: the farthest prediction is the darkest pixel.
    processor = AutoImageProcessor.from_pretrained(tiny_depth_model, backend="pil")
    pred = pipeline("depth-estimation", model=tiny_depth_model, image_processor=processor)(
        Image.open(images / "train" / "img01.png"))
    pred = pred["predicted_depth"].detach().numpy().squeeze()
    np.testing.assert_array_equal(written, prepare_depth.to_disparity_u16(pred, metric=True))
    assert written.ravel()[pred.argmax()] == 0
    # And the folder pipeline now serves the depth task.
    cfg = _folder_cfg(images, task="depth")
    b = next(iter(data.make_train_loader(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)))
    assert b["cond"].shape == (2, 16, 16, 1) and b["cond"].min() >= -1 and b["cond"].max() <= 1


def test_prepare_depth_without_a_model_errors_clearly(tmp_path, capsys):
    _write_images(tmp_path / "imgs", 1)
    with pytest.raises(ValueError, match="--model is required"):
        prepare_depth.prepare_depth(str(tmp_path / "imgs"), None)
    assert prepare_depth.main(["--images", str(tmp_path / "imgs")]) == 2
    assert "--model is required" in capsys.readouterr().err
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="safetensors"):
        prepare_depth.prepare_depth(str(tmp_path / "imgs"), str(tmp_path / "pickled"))


def test_contact_sheet_command(tmp_path, capsys):
    out = tmp_path / "sheet.png"
    contact_sheet.main(["--out", str(out), "--rows", "2", "--size", "16"])
    im = Image.open(out)
    assert im.mode == "RGB" and im.width > 6 * 128 and im.height > 2 * 128 and "wrote" in capsys.readouterr().out
