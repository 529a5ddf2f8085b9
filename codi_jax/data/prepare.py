"""`python -m codi_jax.data.prepare --data_dir DIR [--image_size 32 --num_train N --num_test M]`.

Renders the procedural scenes once into an array_record tensorflow-datasets dataset (see scenes_tfds.py) and prints the
config values to train from it. Depth maps for your own images are `python -m codi_jax.data.prepare_depth`.
"""

from codi_jax.data.scenes_tfds import main

if __name__ == "__main__":
    main()
