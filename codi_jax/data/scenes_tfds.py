"""tensorflow-datasets builder of the procedural scenes, written once as array_record.

    python -m codi_jax.data.prepare --data_dir ~/tensorflow_datasets --image_size 32 --num_train 10000 --num_test 500

then read with `tfds.data_source('codi_scenes/32px_10000_500', split='train', data_dir=...)` or train with
`dataset='tfds', tfds_name='codi_scenes/32px_10000_500'`. Records are the same as the on-the-fly SceneSource
(same seed, same index -> same pixels), plus a procedural edit: 'edited_image' and its 'instruction'.
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from codi_jax.data import scenes


# The data config's tfds keys that read these records as (input, target) pairs for a paired task (edit): the scene is
# the input, its edit the target, the instruction the caption.
PAIRED_KEYS = {"tfds_edit_input_key": "image", "tfds_image_key": "edited_image", "tfds_caption_key": "instruction"}


class CodiScenesConfig(tfds.core.BuilderConfig):

    def __init__(self, *, image_size: int, num_train: int, num_test: int, seed: int = 0, supersample: int = 2,
                 **kwargs):
        kwargs.setdefault("name", f"{image_size}px_{num_train}_{num_test}" + (f"_seed{seed}" if seed else ""))
        super().__init__(description=f"{image_size}x{image_size} procedural scenes, seed {seed}", **kwargs)
        self.image_size, self.num_train, self.num_test = image_size, num_train, num_test
        self.seed, self.supersample = seed, supersample


class CodiScenes(tfds.core.GeneratorBasedBuilder):
    """Ray-cast spheres, boxes and cylinders with exact depth, captions and single-attribute edits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        CodiScenesConfig(name="32px", image_size=32, num_train=50_000, num_test=1_000),
        CodiScenesConfig(name="64px", image_size=64, num_train=50_000, num_test=1_000),
        CodiScenesConfig(name="128px", image_size=128, num_train=20_000, num_test=1_000),
        CodiScenesConfig(name="256px", image_size=256, num_train=10_000, num_test=500),
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds would resolve this through importlib_resources, which it does not install; the file path is all it needs.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(s, s, 3)),
                "depth": tfds.features.Tensor(shape=(s, s), dtype=np.float32),
                "caption": tfds.features.Text(),
                "edited_image": tfds.features.Image(shape=(s, s, 3)),
                "instruction": tfds.features.Text(),
                "index": np.int64,
            }),
            supervised_keys=None,
            # Keep record i == scene i, so the tfds copy and the on-the-fly SceneSource agree index by index.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded: the data is generated
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, n: int):
        c = self.builder_config
        for i in range(n):
            ex = scenes.render_example(c.seed, i, split, c.image_size, edit=True, supersample=c.supersample)
            yield i, {"image": ex["input_image"], "depth": ex["depth"], "caption": ex["caption"],
                      "edited_image": ex["image"], "instruction": ex["instruction"], "index": i}


def prepare(data_dir: str, image_size: int, num_train: int, num_test: int, seed: int = 0,
            supersample: int = 2) -> str:
    """Writes the dataset as array_record under data_dir; returns its tfds name ('codi_scenes/<config>')."""
    if image_size <= 0 or image_size % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    if num_train < 1 or num_test < 1:
        raise ValueError(f"num_train and num_test must be >= 1, got {num_train}, {num_test}")
    config = CodiScenesConfig(image_size=image_size, num_train=num_train, num_test=num_test, seed=seed,
                              supersample=supersample)
    builder = CodiScenes(config=config, data_dir=data_dir)
    builder.download_and_prepare(file_format="array_record")
    return f"codi_scenes/{config.name}"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the procedural scenes as an array_record tfds dataset.")
    p.add_argument("--data_dir", required=True, help="tfds data_dir to write into")
    p.add_argument("--image_size", type=int, default=32, help="resolution (multiple of 8)")
    p.add_argument("--num_train", type=int, default=10_000)
    p.add_argument("--num_test", type=int, default=500)
    p.add_argument("--seed", type=int, default=0, help="procedural world seed (scenes_seed)")
    a = p.parse_args(argv)
    name = prepare(a.data_dir, a.image_size, a.num_train, a.num_test, a.seed)
    print(f"prepared {name}: use dataset='tfds', tfds_name='{name}', data_dir='{a.data_dir}'")


if __name__ == "__main__":
    main()
