"""python -m codi_jax.sample for every export and task: text-to-image from a prompt alone; inputs of any size fitted
(crop / pad / resize, never a silent squash); each task's condition built from the user's file exactly as training
builds it (inpaint masks in both conventions, depth maps of either bit depth, sr at any input size); one file per
output; nothing overwritten; --help without JAX.

The condition tests call the builders directly; sampling runs end to end three times (text-to-image, inpaint, sr) on
the shipped scenes32 teacher and untrained tiny exports (export_untrained: the real export format, seconds to write).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from codi_jax import sample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENES32 = os.path.join(REPO, "codi_jax", "pretrained", "scenes32")


def _spec(task: str, size: int = 32) -> sample.ModelSpec:
    """The tiny configs' geometry (32 px, 4x VAE, two UNet levels) for the condition builders."""
    return sample.ModelSpec(path=f"<{task}>", task=task, channels=sample.TASK_CHANNELS.get(task, 0), size=size,
                            multiple=8, sr_scale=4)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Real tiny exports (untrained, from the shipped teacher) of the two tasks sampled end to end."""
    from codi_jax.testing import export_untrained, tiny_config

    return {task: export_untrained(tiny_config(task, SCENES32), str(tmp_path_factory.mktemp(task)))
            for task in ("inpaint", "sr")}


def test_help_imports_no_jax():
    """--help is argparse alone: nothing that imports JAX, so it answers at once."""
    code = ("import runpy, sys, json\nsys.argv = ['codi_jax.sample', '--help']\n"
            "try:\n    runpy.run_module('codi_jax.sample', run_name='__main__')\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = ('jax', 'flax', 'transformers', 'torch', 'grain', 'tensorflow', 'codi_jax.data.pipeline', "
            "'codi_jax.inference', 'codi_jax.weights')\n"
            "print(json.dumps([m for m in heavy if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [], out.stdout[-500:]
    for needle in ("--out-dir", "--fit", "white = fill", "near = bright", "--depth-kind"):
        assert needle in out.stdout


def test_tables_written_out_agree_with_their_sources():
    from codi_jax import diffusion
    from codi_jax import tasks

    assert sample.METHODS == tuple(diffusion.METHODS)
    assert tasks.depth.KINDS == ("disparity", "depth")


def test_model_spec_of_every_kind_of_folder(exports, tmp_path):
    assert sample.model_spec(SCENES32) == sample.ModelSpec(SCENES32, "t2i", 0, 32, 8, 4)
    assert sample.model_spec(os.path.dirname(exports["inpaint"])).task == "inpaint"  # the workdir works too
    assert sample.model_spec(exports["sr"], sr_scale=2) == sample.ModelSpec(exports["sr"], "sr", 3, 32, 8, 2)
    with pytest.raises(ValueError, match="text-to-image model: it takes no condition image"):
        sample.condition_spec(SCENES32)
    assert sample.condition_spec(exports["inpaint"]) == (4, 32)
    # A diffusers SD folder with no codi_jax metadata: the size from unet sample_size x the VAE factor.
    plain = tmp_path / "sd"
    for sub in ("unet", "vae", "scheduler"):
        (plain / sub).mkdir(parents=True)
        (plain / sub / "config.json").write_text(open(os.path.join(SCENES32, sub, "config.json")).read()
                                                 if sub != "scheduler" else "{}")
    (plain / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="noise schedule is unknown"):
        sample.model_spec(str(plain))
    (plain / "scheduler" / "scheduler_config.json").write_text('{"beta_schedule": "scaled_linear"}')
    assert sample.model_spec(str(plain)) == sample.ModelSpec(str(plain), "t2i", 0, 32, 8, 4)


def test_inpaint_mask_conventions_build_trainings_condition(tmp_path):
    """White = fill (--mask) and alpha 0 = fill (RGBA --image) give exactly make_example's condition for that mask:
    hole mid-grey (0) in the image channels, mask channel +1 in the hole."""
    from codi_jax import tasks
    from codi_jax.data import masks

    img = np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8)
    train = tasks.make_example("inpaint", {"image": img}, np.random.default_rng(5),
                               options=tasks.Options(mask_fraction=0.3))["cond"]
    hole = masks.random_mask(np.random.default_rng(5), 32, 32, 0.3)  # the mask make_example drew
    assert np.array_equal(train[..., 3], hole * 2 - 1) and 0 < hole.mean() < 1
    Image.fromarray(img).save(tmp_path / "photo.png")
    Image.fromarray((hole * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.dstack([img, ((1 - hole) * 255).astype(np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    white, alpha = sample.build_jobs(_spec("inpaint"), [str(tmp_path / "photo.png"), str(tmp_path / "rgba.png")],
                                     ["a"], masks=[str(tmp_path / "mask.png")] * 2)
    assert np.array_equal(white.cond, train) and np.array_equal(alpha.cond, train)  # --mask wins over the alpha
    (only_alpha,) = sample.build_jobs(_spec("inpaint"), [str(tmp_path / "rgba.png")], ["a"])
    assert np.array_equal(only_alpha.cond, train) and "alpha 0 = fill" in only_alpha.note
    with pytest.raises(ValueError, match="needs a mask: pass --mask=mask.png \\(white = fill\\)"):
        sample.build_jobs(_spec("inpaint"), [str(tmp_path / "photo.png")], ["a"])
    # A wide photo padded: the padding is image, never hole.
    wide = np.zeros((16, 64), np.uint8)
    wide[4:12, 30:40] = 255
    Image.fromarray(np.zeros((16, 64, 3), np.uint8)).save(tmp_path / "wide.png")
    Image.fromarray(wide).save(tmp_path / "wide_mask.png")
    (job,) = sample.build_jobs(_spec("inpaint"), [str(tmp_path / "wide.png")], ["a"],
                               masks=[str(tmp_path / "wide_mask.png")], fit_how="pad")
    assert job.box == (12, 0, 8, 32)
    assert np.all(job.cond[:12, :, 3] == -1) and np.all(job.cond[20:, :, 3] == -1) and job.cond[12:20, :, 3].max() == 1
    edge = np.zeros((16, 64), np.uint8)
    edge[:, :4] = 255  # a hole at the left edge: outside the centre square
    Image.fromarray(edge).save(edge_mask := tmp_path / "edge_mask.png")
    with pytest.raises(ValueError, match="marks nothing to fill once fitted with --fit=crop \\(try --fit=pad\\)"):
        sample.build_jobs(_spec("inpaint"), [str(tmp_path / "wide.png")], ["a"], masks=[str(edge_mask)])


def test_depth_maps_normalised_as_in_training(tmp_path):
    """A prepare_depth map (16-bit, or 8-bit), of another size: the condition equals the training pipeline's
    (sources.load_disparity then tasks' disparity_condition) on the same file; a metric map (--depth-kind=depth)
    lands on the same scale and orientation (near = bright) as the disparity map of the same scene."""
    from codi_jax.data import prepare_depth, sources
    from codi_jax.tasks import depth as depth_task

    yy, xx = np.mgrid[0:40, 0:56]
    metric = 1.0 + 3.0 * yy / 40 + 0.1 * np.sin(xx / 5.0)  # metres: the bottom rows are far
    disparity16 = prepare_depth.to_disparity_u16(metric, metric=True)
    Image.fromarray(disparity16).save(tmp_path / "d16.png")
    Image.fromarray((disparity16 >> 8).astype(np.uint8)).save(tmp_path / "d8.png")
    for name in ("d16.png", "d8.png"):
        train = depth_task.disparity_condition({"disparity": sources.load_disparity(str(tmp_path / name), 32)})
        (job,) = sample.build_jobs(_spec("depth"), [str(tmp_path / name)], ["a"])
        assert job.cond.shape == (32, 32, 1) and np.array_equal(job.cond, train), name
        assert job.cond[0].mean() > 0.5 > -0.5 > job.cond[-1].mean()  # near (top) is bright
    (d8,) = sample.build_jobs(_spec("depth"), [str(tmp_path / "d8.png")], ["a"])
    assert np.abs(d8.cond - job.cond).max() < 0.02  # 8 or 16 bits: the same scale
    # Metric depth in millimetres, 16-bit (far = bright in the file): inverted as training inverts metric depth.
    square = metric[:32, :32]
    Image.fromarray(np.round(square * 1000).astype(np.uint16)).save(tmp_path / "mm.png")
    Image.fromarray(prepare_depth.to_disparity_u16(square, metric=True)).save(tmp_path / "disp.png")
    (from_metric,) = sample.build_jobs(_spec("depth"), [str(tmp_path / "mm.png")], ["a"], depth_kind="depth")
    (from_disp,) = sample.build_jobs(_spec("depth"), [str(tmp_path / "disp.png")], ["a"])
    assert np.abs(from_metric.cond - from_disp.cond).max() < 5e-3  # millimetre rounding
    assert np.abs(from_metric.cond - depth_task.disparity_condition({"depth": np.round(square * 1000)})).max() < 1e-5
    # A colourised visualisation is not a depth map: refused unless --convert.
    Image.fromarray(np.dstack([disparity16 >> 8, disparity16 >> 9, disparity16 >> 10]).astype(np.uint8)).save(
        tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour.png' is 56x40, RGB \(3 channel\(s\)\) and has colour: a depth "
                                         r"map is one grey channel .* pass --convert"):
        sample.build_jobs(_spec("depth"), [str(tmp_path / "colour.png")], ["a"])
    (converted,) = sample.build_jobs(_spec("depth"), [str(tmp_path / "colour.png")], ["a"], convert=True)
    assert converted.cond.shape == (32, 32, 1)


def test_sr_condition_helper_is_trainings():
    """make_example's sr condition equals degrade + sr_condition_from_lowres, and the untouched
    degradations.sr_condition: the helper sample uses is training's last step, and training did not change."""
    from codi_jax import tasks
    from codi_jax.data import degradations

    hr = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    train = tasks.make_example("sr", {"image": hr}, np.random.default_rng(1))["cond"]
    before = degradations.sr_condition(hr / np.float32(255), np.random.default_rng(1), 4) * 2 - 1
    helper = tasks.sr.sr_condition_from_lowres(degradations.degrade(hr / np.float32(255), np.random.default_rng(1), 4),
                                            32, 32)
    assert np.array_equal(train, before) and np.array_equal(train, helper)


def test_sr_jobs_of_any_size(tmp_path):
    """Any low-res size runs at sr_scale x its size, padded to the model's multiple with the output box cropped back;
    too large an input names --fit, which brings it to the trained size."""
    from codi_jax import tasks

    lr = np.random.default_rng(2).integers(0, 256, (7, 9, 3), np.uint8)  # 9x7
    Image.fromarray(lr).save(tmp_path / "lr.png")
    (job,) = sample.build_jobs(_spec("sr"), [str(tmp_path / "lr.png")], ["a"])
    assert job.cond.shape == (32, 40, 3) and job.box == (0, 0, 28, 36)
    assert np.array_equal(job.cond[:28, :36], tasks.sr.sr_condition_from_lowres(lr / np.float32(255), 28, 36))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "eight.png")
    assert sample.build_jobs(_spec("sr"), [str(tmp_path / "eight.png")], ["a"])[0].cond.shape == (32, 32, 3)
    Image.fromarray(np.zeros((10, 17, 3), np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match=r"is 17x10: x4 makes 68x40, more than 2 x the 32 px .* pass --fit"):
        sample.build_jobs(_spec("sr"), [str(tmp_path / "wide.png")], ["a"])
    (fitted,) = sample.build_jobs(_spec("sr"), [str(tmp_path / "wide.png")], ["a"], fit_how="pad")
    assert fitted.cond.shape == (32, 32, 3) and fitted.box == (4, 0, 20, 32)  # 17x10 -> 8x5 -> x4


def _disc(w: int, h: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    r = min(w, h) * 0.35
    return (((yy - h / 2 + 0.5) ** 2 + (xx - w / 2 + 0.5) ** 2 < r * r) * 255).astype(np.uint8)


def _aspect(grey: np.ndarray) -> float:
    ys, xs = np.nonzero(grey > 0)
    return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


@pytest.mark.parametrize("how, aspect, note", [(None, 1.0, "64x32 centre-cropped to 32x32;"),
                                               ("crop", 1.0, "centre-cropped"), ("pad", 1.0, "padded to 32x32"),
                                               ("resize", 0.5, "squashed to 32x32 (--fit=resize)")])
def test_fit_never_squashes_unless_asked(tmp_path, how, aspect, note):
    """A disc in a 64x32 image stays round with crop (the default) and pad; only resize makes it an ellipse."""
    Image.fromarray(np.dstack([_disc(64, 32)] * 3)).save(tmp_path / "wide.png")
    (job,) = sample.build_jobs(_spec("edit"), [str(tmp_path / "wide.png")], ["make it red"], fit_how=how)
    top, left, h, w = job.box
    content = job.cond[top:top + h, left:left + w, 0] > 0
    assert abs(_aspect(content) - aspect) < 0.15, _aspect(content)
    assert note in job.note + ";" and job.note.startswith("wide.png 64x32")


def _main(capsys, *argv):
    code = sample.main([str(a) for a in argv])
    return code, capsys.readouterr()


def _refused(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_:
        sample.main([str(a) for a in argv])
    assert exit_.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_text_to_image_writes_one_file_per_image_and_never_overwrites(tmp_path, capsys):
    """A prompt alone, twice, two images each, in batches of 3: one file per image; the same prompt and seed give
    the same image in another batch (its noise comes from its seed alone); a second run refuses to overwrite."""
    out = tmp_path / "new" / "dir"
    code, cap = _main(capsys, f"--model={SCENES32}", "--prompt", "a red sphere", "a red sphere", "--num-images=2",
                      "--steps=1", "--batch-size=3", f"--out-dir={out}")
    assert code == 0 and "wrote 4 image(s)" in cap.out and "t2i, ddim sampler, 1 step," in cap.out
    names = ["a_red_sphere-2_s0.png", "a_red_sphere-2_s1.png", "a_red_sphere_s0.png", "a_red_sphere_s1.png"]
    assert sorted(os.listdir(out)) == names
    images = {name: np.asarray(Image.open(out / name)) for name in names}
    assert images[names[2]].shape == (32, 32, 3) and not np.array_equal(images[names[2]], images[names[3]])
    assert np.array_equal(images[names[0]], images[names[2]]) and np.array_equal(images[names[1]], images[names[3]])
    line = _refused(capsys, f"--model={SCENES32}", "--prompt=a red sphere", "--steps=1", f"--out-dir={out}")
    assert "a_red_sphere_s0.png' already exists" in line and "--overwrite" in line
    assert "takes no input image" in _refused(capsys, f"--model={SCENES32}", "--prompt=a", f"--image={out}/x.png",
                                              f"--out-dir={out}")


def test_inpaint_batch_any_aspect_end_to_end(exports, tmp_path, capsys):
    """Two photos of another aspect (one with a mask file, one with alpha 0 = fill), padded: one file per image at
    the input's aspect, plus the side-by-side grid; mistakes are one line before the model loads."""
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (48, 64, 3), np.uint8)
    hole = np.zeros((48, 64), np.uint8)
    hole[10:30, 20:40] = 255
    Image.fromarray(photo).save(tmp_path / "photo.png")
    Image.fromarray(hole).save(tmp_path / "mask.png")
    Image.fromarray(np.dstack([photo, 255 - hole]), "RGBA").save(tmp_path / "cut.png")
    out = tmp_path / "out"
    line = _refused(capsys, f"--model={exports['inpaint']}", f"--image={tmp_path / 'photo.png'}", "--prompt=a",
                    f"--out-dir={out}")
    assert "needs a mask" in line and not out.exists()
    assert "--mask is for inpaint models" in _refused(capsys, f"--model={exports['sr']}", "--prompt=a",
                                                      f"--image={tmp_path / 'photo.png'}", f"--mask={tmp_path}/m.png",
                                                      f"--out-dir={out}")
    code, cap = _main(capsys, f"--model={exports['inpaint']}", "--image", tmp_path / "photo.png", tmp_path / "cut.png",
                      "--mask", tmp_path / "mask.png", tmp_path / "mask.png", "--prompt", "a red sphere",
                      "--fit=pad", "--steps=1", f"--out-dir={out}", f"--out={tmp_path / 'grid.png'}")
    assert code == 0, cap.err
    assert "photo.png 64x48 resized to 32x24, padded to 32x32 (output cropped back to 32x24)" in cap.out
    assert sorted(os.listdir(out)) == ["cut_s0.png", "photo_s0.png"]
    assert Image.open(out / "photo_s0.png").size == (32, 24) and Image.open(tmp_path / "grid.png").size == (64, 24)


def test_sr_output_is_scale_times_the_input(exports, tmp_path, capsys):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (7, 9, 3), np.uint8)).save(tmp_path / "lr.png")
    code, cap = _main(capsys, f"--model={exports['sr']}", f"--image={tmp_path / 'lr.png'}", "--prompt=a",
                      "--steps=1", f"--out-dir={tmp_path}")
    assert code == 0, cap.err
    assert "lr.png 9x7, x4 -> 36x28 (run at 40x32, a multiple of 8, output cropped back)" in cap.out
    assert Image.open(tmp_path / "lr_s0.png").size == (36, 28)
