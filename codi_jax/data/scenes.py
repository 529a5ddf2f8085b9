"""Procedural 3D scene dataset: a numpy ray caster of spheres, boxes and cylinders on a ground plane.

Every example is a pure function of (seed, split, index): `sample_scene` draws the scene graph, `render` ray-casts it at
any resolution (hard shadows, one mirror bounce for shiny objects, analytic contact occlusion) and returns the image,
the exact z-depth and an object-id buffer; `caption` describes the scene graph with relations measured from the
geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import numpy as np

# Linear-RGB albedos; the names are the caption vocabulary, so keep them visually unambiguous.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.72, 0.06, 0.05),
    "green": (0.08, 0.45, 0.10),
    "blue": (0.05, 0.14, 0.70),
    "yellow": (0.80, 0.62, 0.04),
    "purple": (0.35, 0.07, 0.55),
    "orange": (0.90, 0.28, 0.03),
    "cyan": (0.05, 0.55, 0.62),
    "white": (0.80, 0.80, 0.78),
    "pink": (0.85, 0.30, 0.45),
    "brown": (0.30, 0.14, 0.05),
}
COLOURS = tuple(PALETTE)
SHAPES = ("sphere", "box", "cylinder")
MATERIALS = ("matte", "shiny")
RELATIONS = ("left of", "right of", "in front of", "behind")
# Sky rays have no surface; their depth is this far-plane value so depth maps stay finite.
FAR = 100.0
# Each split is its own random stream (the value is part of every seed), so the splits are different scenes by
# construction. New splits take new values: the test scenes, on which the reported numbers were measured, stay the same.
SPLITS = {"train": 0, "test": 1, "validation": 2}
_EPS = 1e-4


@dataclasses.dataclass(frozen=True)
class Obj:
    shape: str  # one of SHAPES
    colour: str  # key of PALETTE
    material: str  # one of MATERIALS
    centre: tuple[float, float, float]  # world position; y is the vertical axis, objects rest on y=0
    size: tuple[float, float, float]  # sphere (r,r,r); box half extents; cylinder (r, height, r)
    angle: float = 0.0  # rotation about the vertical axis (boxes)
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)  # small per-object albedo jitter; keeps the colour name true

    @property
    def footprint(self) -> float:
        """Radius of the object's bounding circle on the ground."""
        if self.shape == "box":
            return math.hypot(self.size[0], self.size[2])
        return self.size[0]


@dataclasses.dataclass(frozen=True)
class Camera:
    position: tuple[float, float, float]
    target: tuple[float, float, float]
    fov_deg: float  # vertical field of view


@dataclasses.dataclass(frozen=True)
class Light:
    direction: tuple[float, float, float]  # unit vector pointing *towards* the light
    colour: tuple[float, float, float]  # linear RGB intensity


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    camera: Camera
    lights: tuple[Light, ...]
    ground: tuple[float, float, float]
    checker: float  # contrast of the ground checkerboard, 0 = plain
    sky_horizon: tuple[float, float, float]
    sky_zenith: tuple[float, float, float]

    def replace_object(self, i: int, **changes) -> "Scene":
        objs = list(self.objects)
        objs[i] = dataclasses.replace(objs[i], **changes)
        return dataclasses.replace(self, objects=tuple(objs))


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _cross(a, b) -> np.ndarray:
    # np.cross costs ~20 us of argument handling per call; these are single 3-vectors.
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


@functools.lru_cache(maxsize=256)
def _camera_basis(cam: Camera) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(forward, right, up) unit vectors; cached because captions and every render pass ask again."""
    pos = np.asarray(cam.position, np.float64)
    fwd = _normalize(np.asarray(cam.target, np.float64) - pos)
    right = _normalize(_cross(fwd, (0.0, 1.0, 0.0)))
    up = _cross(right, fwd)
    for v in (fwd, right, up):
        v.flags.writeable = False
    return fwd, right, up


def _primary_rays(cam: Camera, height: int, width: int, offsets: Sequence[tuple[float, float]]):
    """Unit ray directions, shape (len(offsets), H*W, 3), for sub-pixel offsets in [0,1)^2."""
    fwd, right, up = _camera_basis(cam)
    half_h = math.tan(math.radians(cam.fov_deg) / 2)
    half_w = half_h * width / height
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    dirs = []
    for ox, oy in offsets:
        u = ((xs + ox) / width * 2 - 1) * half_w
        v = (1 - (ys + oy) / height * 2) * half_h
        d = fwd + u.reshape(-1, 1) * right + v.reshape(-1, 1) * up
        dirs.append(_normalize(d))
    return np.stack(dirs)


# ----------------------------------------------------------------------------------------------------------------------
# Ray-primitive intersections. All take origins o (N,3), unit directions d (N,3) and return t (N,) (inf = miss) and
# outward normals (N,3). Only hits with t > _EPS count, so shadow rays leaving a surface do not hit it again.


def _hit_sphere(o, d, obj: Obj):
    c = np.asarray(obj.centre)
    r = obj.size[0]
    oc = o - c
    b = np.einsum("ij,ij->i", oc, d)
    cc = np.einsum("ij,ij->i", oc, oc) - r * r
    disc = b * b - cc
    sq = np.sqrt(np.maximum(disc, 0.0))
    t0, t1 = -b - sq, -b + sq
    t = np.where(t0 > _EPS, t0, np.where(t1 > _EPS, t1, np.inf))
    t = np.where(disc >= 0, t, np.inf)
    n = (o + np.nan_to_num(t, posinf=0.0)[:, None] * d - c) / r
    return t, n


def _rot_y(angle: float) -> np.ndarray:
    ca, sa = math.cos(angle), math.sin(angle)
    return np.array([[ca, 0.0, sa], [0.0, 1.0, 0.0], [-sa, 0.0, ca]])


def _hit_box(o, d, obj: Obj):
    rot = _rot_y(obj.angle)  # local -> world
    lo = (o - np.asarray(obj.centre)) @ rot  # world -> local is rot^T, applied on the right
    ld = d @ rot
    h = np.asarray(obj.size)
    safe = np.where(np.abs(ld) < 1e-12, 1e-12, ld)
    inv = 1.0 / safe
    t1, t2 = (-h - lo) * inv, (h - lo) * inv
    tnear, tfar = np.minimum(t1, t2), np.maximum(t1, t2)
    tmin, tmax = tnear.max(axis=1), tfar.min(axis=1)
    hit = (tmax >= np.maximum(tmin, _EPS))
    t = np.where(hit, np.where(tmin > _EPS, tmin, tmax), np.inf)
    # The entry face is the axis whose slab was entered last; its normal faces the ray.
    axis = np.where(tmin > _EPS, tnear.argmax(axis=1), tfar.argmin(axis=1))
    n_local = np.zeros_like(lo)
    sign = -np.sign(ld[np.arange(len(ld)), axis])
    sign = np.where(tmin > _EPS, sign, -sign)
    n_local[np.arange(len(ld)), axis] = sign
    return t, n_local @ rot.T


def _hit_cylinder(o, d, obj: Obj):
    cx, _, cz = obj.centre
    r, height = obj.size[0], obj.size[1]
    ox, oz = o[:, 0] - cx, o[:, 2] - cz
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = ox * d[:, 0] + oz * d[:, 2]
    c = ox * ox + oz * oz - r * r
    disc = b * b - a * c
    a_safe = np.where(a < 1e-12, 1e-12, a)
    sq = np.sqrt(np.maximum(disc, 0.0))
    ts = []
    for cand in ((-b - sq) / a_safe, (-b + sq) / a_safe):
        y = o[:, 1] + cand * d[:, 1]
        ts.append(np.where((disc >= 0) & (a > 1e-12) & (cand > _EPS) & (y >= 0) & (y <= height), cand, np.inf))
    t_side = np.minimum(ts[0], ts[1])
    dy = np.where(np.abs(d[:, 1]) < 1e-12, 1e-12, d[:, 1])
    t_cap = (height - o[:, 1]) / dy
    px, pz = ox + t_cap * d[:, 0], oz + t_cap * d[:, 2]
    t_cap = np.where((t_cap > _EPS) & (px * px + pz * pz <= r * r), t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    p = o + np.nan_to_num(t, posinf=0.0)[:, None] * d
    n_side = np.stack([p[:, 0] - cx, np.zeros_like(t), p[:, 2] - cz], axis=1) / r
    n_cap = np.tile(np.array([0.0, 1.0, 0.0]), (len(t), 1))
    n = np.where((t_cap <= t_side)[:, None], n_cap, n_side)
    return t, n


_HIT = {"sphere": _hit_sphere, "box": _hit_box, "cylinder": _hit_cylinder}


def _bounds(obj: Obj) -> tuple[np.ndarray, float]:
    if obj.shape == "sphere":
        return np.asarray(obj.centre), obj.size[0]
    if obj.shape == "box":
        return np.asarray(obj.centre), float(np.linalg.norm(obj.size))
    r, h = obj.size[0], obj.size[1]
    return np.array([obj.centre[0], h / 2, obj.centre[2]]), math.hypot(r, h / 2)


def _hit(obj: Obj, o, d):
    """Exact intersection, run only on the rays that reach the object's bounding sphere (most rays miss it)."""
    c, r = _bounds(obj)
    oc = o - c
    b = np.einsum("ij,ij->i", oc, d)
    disc = b * b - (np.einsum("ij,ij->i", oc, oc) - r * r)
    cand = np.nonzero((disc >= 0) & (-b + np.sqrt(np.maximum(disc, 0.0)) > _EPS))[0]
    t = np.full(len(o), np.inf)
    n = np.zeros((len(o), 3))
    if len(cand):
        t[cand], n[cand] = _HIT[obj.shape](o[cand], d[cand], obj)
    return t, n


def _intersect(scene: Scene, o, d, with_ground: bool = True):
    """Nearest hit: t (N,), id (N,) (-1 ground, -2 nothing), normal (N,3)."""
    n_rays = len(o)
    best_t = np.full(n_rays, np.inf)
    best_id = np.full(n_rays, -2, np.int32)
    best_n = np.zeros((n_rays, 3))
    if with_ground:
        dy = d[:, 1]
        tg = np.where(dy < -1e-9, -o[:, 1] / np.where(dy < -1e-9, dy, -1.0), np.inf)
        tg = np.where((tg > _EPS) & (tg < FAR), tg, np.inf)  # beyond FAR the ground is sky, so depth <= FAR
        hit = tg < best_t
        best_t, best_id = np.where(hit, tg, best_t), np.where(hit, -1, best_id)
        best_n[hit] = (0.0, 1.0, 0.0)
    for i, obj in enumerate(scene.objects):
        t, n = _hit(obj, o, d)
        hit = t < best_t
        best_t, best_id = np.where(hit, t, best_t), np.where(hit, i, best_id)
        best_n = np.where(hit[:, None], n, best_n)
    return best_t, best_id, best_n


def _occluded(scene: Scene, p, light_dir) -> np.ndarray:
    d = np.broadcast_to(light_dir, p.shape)
    blocked = np.zeros(len(p), bool)
    for obj in scene.objects:
        t, _ = _hit(obj, p, d)
        blocked |= np.isfinite(t)
    return blocked


def _contact_occlusion(scene: Scene, p, n, ids) -> np.ndarray:
    """Analytic occlusion by each object approximated as a sphere: darkens the ground where objects touch it."""
    ao = np.ones(len(p))
    for i, obj in enumerate(scene.objects):
        if obj.shape == "sphere":
            c, r = np.asarray(obj.centre), obj.size[0]
        else:
            half_h = obj.size[1] if obj.shape == "box" else obj.size[1] / 2
            c = np.array([obj.centre[0], half_h, obj.centre[2]])
            r = 0.85 * max(obj.footprint, half_h) if obj.shape == "box" else 0.9 * max(obj.size[0], half_h)
        v = c - p
        dist2 = np.maximum(np.einsum("ij,ij->i", v, v), 1e-6)
        cos = np.clip(np.einsum("ij,ij->i", n, v) / np.sqrt(dist2), 0.0, 1.0)
        occ = np.clip(cos * r * r / dist2, 0.0, 1.0)
        ao *= np.where(ids == i, 1.0, 1.0 - 0.8 * occ)
    return ao


def _sky(scene: Scene, d) -> np.ndarray:
    h = np.clip(d[:, 1], 0.0, 1.0) ** 0.6
    return (1 - h)[:, None] * np.asarray(scene.sky_horizon) + h[:, None] * np.asarray(scene.sky_zenith)


def _shade(scene: Scene, o, d, reflect: bool) -> np.ndarray:
    t, ids, n = _intersect(scene, o, d)
    colour = _sky(scene, d)
    hit = ids >= -1
    if not hit.any():
        return colour
    idx = np.nonzero(hit)[0]
    th, ih, nh, dh = t[idx], ids[idx], n[idx], d[idx]
    p = o[idx] + th[:, None] * dh
    # Albedo: ground (optionally checkered) or object palette colour.
    albedo = np.tile(np.asarray(scene.ground), (len(idx), 1))
    ground = ih == -1
    if scene.checker > 0:
        check = (np.floor(p[:, 0]) + np.floor(p[:, 2])) % 2
        albedo = albedo * np.where(ground & (check > 0), 1 - scene.checker, 1.0)[:, None]
    shiny = np.zeros(len(idx), bool)
    for i, obj in enumerate(scene.objects):
        m = ih == i
        albedo[m] = np.asarray(PALETTE[obj.colour]) * np.asarray(obj.tint)
        shiny[m] = obj.material == "shiny"
    p_off = p + nh * 1e-3
    ao = _contact_occlusion(scene, p, nh, ih)
    # Hemispheric ambient: sky from above, ground bounce from below.
    up = 0.5 + 0.5 * nh[:, 1:2]
    ambient = (up * np.asarray(scene.sky_zenith) + (1 - up) * np.asarray(scene.ground) * 0.6) * 0.55
    lin = albedo * ambient * ao[:, None]
    spec = np.zeros_like(lin)
    for light in scene.lights:
        ldir = np.asarray(light.direction)
        ndl = np.clip(nh @ ldir, 0.0, None)
        lit = np.zeros(len(idx), bool)
        facing = np.nonzero(ndl > 0)[0]  # surfaces facing away are dark anyway: no shadow ray needed
        lit[facing] = ~_occluded(scene, p_off[facing], ldir)
        ndl = ndl * lit
        lin += albedo * ndl[:, None] * np.asarray(light.colour)
        half = _normalize(ldir - dh)
        ndh = np.clip(np.einsum("ij,ij->i", nh, half), 0.0, 1.0)
        ks = np.where(shiny, 0.9, 0.06)
        expo = np.where(shiny, 80.0, 8.0)
        spec += (ks * ndh**expo * lit * (ndl > 0))[:, None] * np.asarray(light.colour)
    lin += spec
    if reflect and shiny.any():
        r_idx = np.nonzero(shiny)[0]
        rd = dh[r_idx] - 2 * np.einsum("ij,ij->i", dh[r_idx], nh[r_idx])[:, None] * nh[r_idx]
        cos = np.clip(-np.einsum("ij,ij->i", dh[r_idx], nh[r_idx]), 0.0, 1.0)
        fresnel = 0.12 + 0.5 * (1 - cos) ** 5  # Schlick with a modest base reflectance
        refl = _shade(scene, p_off[r_idx], _normalize(rd), reflect=False)
        lin[r_idx] = lin[r_idx] * (1 - fresnel[:, None]) + refl * fresnel[:, None]
    # Aerial perspective hides the aliasing of the far ground near the horizon.
    fog = np.exp(-np.maximum(th - 8.0, 0.0) / 18.0)[:, None]
    colour[idx] = lin * fog + np.asarray(scene.sky_horizon) * (1 - fog)
    return colour


@functools.lru_cache(maxsize=4)
def _centre_hits(scene: Scene, height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel-centre rays and their nearest hits (t, ids); cached because sampling a scene already cast them once."""
    cam = scene.camera
    centre = _primary_rays(cam, height, width, [(0.5, 0.5)])[0]
    t, ids, _ = _intersect(scene, np.broadcast_to(np.asarray(cam.position, np.float64), centre.shape), centre)
    for a in (centre, t, ids):
        a.flags.writeable = False
    return centre, t, ids


def render(scene: Scene, height: int, width: int | None = None, supersample: int = 2) -> dict[str, np.ndarray]:
    """Ray-casts a scene.

    Returns 'image' float32 (H,W,3) in [0,1] (sRGB, `supersample`^2 rays per pixel), 'depth' float32 (H,W): exact
    z-depth along the camera axis of the pixel-centre ray (FAR for sky), 'ids' int32 (H,W): object index, -1 ground,
    -2 sky.
    """
    width = height if width is None else width
    cam = scene.camera
    origin = np.asarray(cam.position, np.float64)
    fwd, _, _ = _camera_basis(cam)
    centre, t, ids = _centre_hits(scene, height, width)
    depth = np.where(np.isfinite(t), t * (centre @ fwd), FAR).clip(max=FAR)
    s = max(int(supersample), 1)
    offsets = [((i + 0.5) / s, (j + 0.5) / s) for j in range(s) for i in range(s)]
    dirs = _primary_rays(cam, height, width, offsets).reshape(-1, 3)
    lin = _shade(scene, np.broadcast_to(origin, dirs.shape), dirs, reflect=True)
    lin = lin.reshape(len(offsets), height * width, 3).mean(axis=0)
    # Exposure + soft shoulder, then sRGB-like gamma.
    lin = lin * 1.1
    lin = lin / (1 + 0.25 * lin)
    img = np.clip(lin, 0.0, 1.0) ** (1 / 2.2)
    return {
        "image": img.reshape(height, width, 3).astype(np.float32),
        "depth": depth.reshape(height, width).astype(np.float32),
        "ids": ids.reshape(height, width).astype(np.int32),
    }


# ----------------------------------------------------------------------------------------------------------------------
# Scene sampling.


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    # The split is part of the key, so train, validation and test are different streams: disjoint by construction.
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def _sample_objects(rng: np.random.Generator, n: int) -> list[Obj]:
    objs: list[Obj] = []
    used: set[tuple[str, str]] = set()
    tries = 0
    while len(objs) < n and tries < 200:
        tries += 1
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        if (colour, shape) in used:  # captions must identify objects uniquely
            continue
        material = MATERIALS[int(rng.random() < 0.4)]
        if shape == "sphere":
            r = rng.uniform(0.45, 0.9)
            size, y = (r, r, r), r
        elif shape == "box":
            hx, hy, hz = rng.uniform(0.35, 0.75, size=3)
            size, y = (hx, hy, hz), hy
        else:
            r, h = rng.uniform(0.3, 0.6), rng.uniform(0.7, 1.7)
            size, y = (r, h, r), 0.0
        x, z = rng.uniform(-2.4, 2.4, size=2)
        cand = Obj(shape, colour, material, (float(x), float(y), float(z)), tuple(float(s) for s in size),
                   float(rng.uniform(0, math.pi / 2)), tuple(float(v) for v in rng.uniform(0.9, 1.1, size=3)))
        if any(math.hypot(x - o.centre[0], z - o.centre[2]) < cand.footprint + o.footprint + 0.15 for o in objs):
            continue
        objs.append(cand)
        used.add((colour, shape))
    return objs


def _sample_camera(rng: np.random.Generator, objs: Sequence[Obj]) -> Camera:
    cx = float(np.mean([o.centre[0] for o in objs]))
    cz = float(np.mean([o.centre[2] for o in objs]))
    az = rng.uniform(0, 2 * math.pi)
    el = math.radians(rng.uniform(14, 38))
    dist = rng.uniform(4.8, 7.5)
    pos = (cx + dist * math.cos(el) * math.cos(az), dist * math.sin(el), cz + dist * math.cos(el) * math.sin(az))
    return Camera(pos, (cx, rng.uniform(0.3, 0.7), cz), float(rng.uniform(38, 50)))


def _sample_lights(rng: np.random.Generator) -> tuple[Light, ...]:
    lights = []
    n = 1 + int(rng.random() < 0.5)
    for k in range(n):
        az = rng.uniform(0, 2 * math.pi)
        el = math.radians(rng.uniform(30, 70))
        direction = (math.cos(el) * math.cos(az), math.sin(el), math.cos(el) * math.sin(az))
        warm = rng.uniform(-0.08, 0.08)
        strength = (1.0 if k == 0 else 0.45) * rng.uniform(0.85, 1.15)
        lights.append(Light(direction, (strength * (1 + warm), strength, strength * (1 - warm))))
    return tuple(lights)


_GROUNDS = ((0.42, 0.42, 0.40), (0.50, 0.44, 0.36), (0.33, 0.38, 0.33), (0.55, 0.55, 0.55), (0.40, 0.36, 0.42))


def visible_pixels(scene: Scene, resolution: int = 32) -> np.ndarray:
    """Pixel count of each object in the id buffer at `resolution` (one ray per pixel)."""
    _, _, ids = _centre_hits(scene, resolution, resolution)
    return np.bincount(ids[ids >= 0], minlength=len(scene.objects))


def sample_scene(seed: int, index: int, split: str = "train", min_objects: int = 1,
                 max_objects: int = 3) -> Scene:
    """Draws the scene graph of example `index`; every object is at least 1.5 % visible, so captions are true."""
    rng = _rng(seed, split, index)
    for _ in range(50):
        n = int(rng.integers(min_objects, max_objects + 1))
        objs = _sample_objects(rng, n)
        if len(objs) < min_objects:
            continue
        scene = Scene(
            objects=tuple(objs),
            camera=_sample_camera(rng, objs),
            lights=_sample_lights(rng),
            ground=tuple(float(v) for v in np.asarray(_GROUNDS[rng.integers(len(_GROUNDS))]) * rng.uniform(0.85, 1.1)),
            checker=float(rng.choice([0.0, 0.0, 0.12, 0.2])),
            sky_horizon=tuple(float(v) for v in np.array([0.75, 0.80, 0.85]) * rng.uniform(0.85, 1.05, size=3)),
            sky_zenith=tuple(float(v) for v in np.array([0.30, 0.45, 0.75]) * rng.uniform(0.8, 1.1, size=3)),
        )
        vis = visible_pixels(scene)
        if (vis >= 0.015 * 32 * 32).all():
            return scene
    raise RuntimeError(f"could not place visible objects for scene {index} (seed {seed})")  # never seen in practice


# ----------------------------------------------------------------------------------------------------------------------
# Captions and edits.


def relation(scene: Scene, a: int, b: int) -> str:
    """Spatial relation of object a to object b as seen from the camera."""
    fwd, right, _ = _camera_basis(scene.camera)
    pa, pb = np.asarray(scene.objects[a].centre), np.asarray(scene.objects[b].centre)
    dx, dz = float((pa - pb) @ right), float((pa - pb) @ fwd)
    if abs(dx) >= 0.6 * abs(dz):
        return "left of" if dx < 0 else "right of"
    return "in front of" if dz < 0 else "behind"


def _noun(obj: Obj, article: str, material: bool = True) -> str:
    adj = "shiny " if (material and obj.material == "shiny") else ""
    return f"{article} {adj}{obj.colour} {obj.shape}"


def caption(scene: Scene) -> str:
    """E.g. 'a red sphere left of a shiny blue box, and a green cylinder behind the blue box'."""
    objs = scene.objects
    # Describe left to right so the sentence reads like the image.
    _, right, _ = _camera_basis(scene.camera)
    order = sorted(range(len(objs)), key=lambda i: float(np.asarray(objs[i].centre) @ right))
    text = _noun(objs[order[0]], "a")
    if len(order) > 1:
        text += f" {relation(scene, order[0], order[1])} {_noun(objs[order[1]], 'a')}"
    for prev, cur in zip(order[1:], order[2:]):
        text += f", and {_noun(objs[cur], 'a')} {relation(scene, cur, prev)} {_noun(objs[prev], 'the', False)}"
    return text


def sample_edit(scene: Scene, rng: np.random.Generator) -> tuple[Scene, str]:
    """One attribute change (colour or material) of one object, with its instruction."""
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    taken = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.75:
        options = [c for c in COLOURS if c != obj.colour and (c, obj.shape) not in taken]
        new = options[int(rng.integers(len(options)))]
        return scene.replace_object(i, colour=new), f"make the {obj.colour} {obj.shape} {new}"
    new_mat = "matte" if obj.material == "shiny" else "shiny"
    return scene.replace_object(i, material=new_mat), f"make the {obj.colour} {obj.shape} {new_mat}"


def caption_words() -> list[str]:
    """Every word the caption and edit grammars can produce (the builtin tokenizer's vocabulary)."""
    words = ["a", "the", "and", "make", ",", "left", "right", "of", "in", "front", "behind"]
    return words + list(COLOURS) + list(SHAPES) + list(MATERIALS)


def render_example(seed: int, index: int, split: str, height: int, *, edit: bool = False, min_objects: int = 1,
                   max_objects: int = 3, supersample: int = 2) -> dict:
    """Example `index` of a split as the sources emit it: uint8 image, float32 z-depth, caption, 'ids' int32 (H,W)
    (the object each pixel-centre ray hits, an index into the scene's objects; -1 ground, -2 sky: inpainting's
    object-shaped holes), and the edit fields. With edit, depth and ids are the input scene's (an edit changes
    one object's colour or material, never the geometry)."""
    scene = sample_scene(seed, index, split, min_objects, max_objects)
    out = render(scene, height, height, supersample)
    ex = {"image": _to_uint8(out["image"]), "depth": out["depth"], "caption": caption(scene), "ids": out["ids"]}
    if edit:
        edited, instruction = sample_edit(scene, np.random.default_rng([int(seed), SPLITS[split], int(index), 7]))
        ex["input_image"] = ex["image"]
        ex["image"] = _to_uint8(render(edited, height, height, supersample)["image"])
        ex["instruction"] = instruction
    return ex


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
