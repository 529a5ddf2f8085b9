"""Contact sheet of the scene dataset and every task's condition, as the pipeline produces them.

    python -m codi_jax.data.contact_sheet --out docs/contact_sheet.png                     # 128 px, one row per scene
    python -m codi_jax.data.contact_sheet --out docs/contact_sheet_32px.png --size 32      # the embedded default

Columns: target image | depth condition | sr condition | inpaint condition (masked image, mask tinted) | edit input |
edit target; the caption (and the edit instruction) under each row. Every tile is the task's actual output for the
same test record, so the sheet shows what the model is trained on.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from codi_jax import tasks
from codi_jax.data import scenes

COLUMNS = ("image", "depth", "sr (x4 degraded)", "inpaint", "edit: input", "edit: target")


def _u8(signed: np.ndarray) -> np.ndarray:
    return np.round((np.clip(signed, -1, 1) + 1) * 127.5).astype(np.uint8)


def _tiles(index: int, size: int, seed: int) -> tuple[list[np.ndarray], str, str]:
    rec = scenes.render_example(0, index, "test", size, edit=True)
    # The edit record's 'image' is the edited scene; the other tasks use the original ('input_image').
    orig = {"image": rec["input_image"], "depth": rec["depth"], "caption": rec["caption"]}
    rng = lambda k: np.random.default_rng([seed, index, k])  # noqa: E731
    depth = tasks.make_example("depth", orig, rng(0))["cond"]
    sr = tasks.make_example("sr", orig, rng(1))["cond"]
    inp = tasks.make_example("inpaint", orig, rng(2), options=tasks.Options(mask_fraction=0.3))["cond"]
    edit = tasks.make_example("edit", rec, rng(3))
    # Show the inpaint holes tinted so the mask is visible next to the masked image.
    masked = _u8(inp[..., :3]).astype(np.float32)
    hole = (inp[..., 3] > 0)[..., None]
    masked = np.where(hole, 0.45 * masked + 0.55 * np.array([255, 0, 255]), masked).astype(np.uint8)
    tiles = [orig["image"], np.repeat(_u8(depth), 3, -1), _u8(sr), masked, _u8(edit["cond"]), _u8(edit["image"])]
    return tiles, rec["caption"], rec["instruction"]


def make_sheet(rows: int = 6, size: int = 128, seed: int = 0, zoom: int | None = None) -> Image.Image:
    zoom = zoom or max(1, 128 // size)
    tile = size * zoom
    pad, text_h, head_h = 4, 34, 22
    font = ImageFont.load_default(size=13)
    width = len(COLUMNS) * (tile + pad) + pad
    height = head_h + rows * (tile + text_h + pad)
    sheet = Image.new("RGB", (width, height), (250, 250, 248))
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(COLUMNS):
        draw.text((pad + c * (tile + pad) + 2, 4), name, fill=(40, 40, 40), font=font)
    for r in range(rows):
        tiles, caption, instruction = _tiles(r, size, seed)
        y = head_h + r * (tile + text_h + pad)
        for c, t in enumerate(tiles):
            im = Image.fromarray(t).resize((tile, tile), Image.Resampling.NEAREST)
            sheet.paste(im, (pad + c * (tile + pad), y))
        draw.text((pad + 2, y + tile + 2), caption, fill=(20, 20, 20), font=font)
        draw.text((pad + 2, y + tile + 17), f"edit: {instruction}", fill=(90, 60, 130), font=font)
    return sheet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write a contact sheet of scenes, depth, captions and task conditions.")
    p.add_argument("--out", required=True, help="output PNG path")
    p.add_argument("--rows", type=int, default=6)
    p.add_argument("--size", type=int, default=128, help="render resolution (tiles are upscaled to >= 128 px)")
    p.add_argument("--seed", type=int, default=0, help="seed of the task randomness (masks, degradations)")
    a = p.parse_args(argv)
    sheet = make_sheet(a.rows, a.size, a.seed)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    sheet.save(a.out, optimize=True)
    print(f"wrote {a.out} ({sheet.width}x{sheet.height}, {os.path.getsize(a.out) // 1024} KB)")


if __name__ == "__main__":
    main()
