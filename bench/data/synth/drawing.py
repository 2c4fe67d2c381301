"""Procedural chest radiographs: body, lungs, heart, mediastinum, spine, ribs, clavicles and diaphragm,
with each finding drawn where a radiologist would look for it. Coordinates are fractions of the image;
x grows to the image right, which is the patient's left (radiographs are viewed facing the patient).

What tells a finding apart is its shape, texture, place relative to the anatomy or a relation between
structures, not a change of brightness: every image also carries nuisance variation (pose and build, the
depth of inspiration, heart density, soft-tissue shadows over the lungs, exposure, noise) at least as large
as any finding's effect on the mean intensity of its region. So a model has to learn what a finding looks
like; a linear read-out of random features does not find it. `Difficulty` scales the two sides.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bench.data.synth.findings import Finding, Patient

SIDE_X = {"right": 0.29, "left": 0.71}  # lung centres by the patient's side


@dataclass(frozen=True)
class Difficulty:
    """`finding` multiplies every finding's contrast (its lines, edges and textures); `nuisance` multiplies
    every nuisance's spread (pose, build, inspiration, heart density, soft-tissue shadows, exposure, noise)."""

    finding: float
    nuisance: float


# the levels bench.data.synth.DIFFICULTIES names. easy: findings well above mild nuisance; standard (the default
# benchmark): the mean intensity of a finding's hemithorax varies from patient to patient at least as much as
# the finding shifts it (tests/test_synth.py), so shape and texture tell it, and the tiny preset learns it in a
# few minutes of CPU pretraining; hard: findings as faint as the nuisance is wide, for longer pretraining.
# Version 6's standard was (1.5, 0.5): once the tiny preset had its convolutional stem, the linear probe on
# its random features reached 0.91 AUC on CheXpert and 0.75 on SIIM there, so random features nearly solved it
DIFFICULTIES = {"easy": Difficulty(2.0, 0.3), "standard": Difficulty(1.25, 0.75), "hard": Difficulty(1.0, 1.0)}


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (d < 1), 0 outside, with a smooth rim of relative width `edge`."""
    return np.clip((1.0 - d) / edge, 0.0, 1.0)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, rx: float, ry: float, edge: float = 0.08):
    return _soft(np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2), edge)


def _noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: random cells upsampled bicubically."""
    h, w = shape
    small = rng.random((cells, max(2, int(cells * w / h)))).astype(np.float32)
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return np.asarray(img, dtype=np.float32) / 255.0


def _lines(rng: np.random.Generator, shape: tuple[int, int], cells: int, width: float) -> np.ndarray:
    """A network of thin bright lines (the level set of smooth noise), in [0, 1]."""
    return _soft(np.abs(_noise(rng, shape, cells) - 0.5) / width, 0.5)


def _texture(t: np.ndarray, height: int) -> np.ndarray:
    """`t` less its local mean: a texture that leaves the mean intensity of its region unchanged."""
    return t - gaussian_filter(t, sigma=0.025 * height)


def _sides(f: Finding) -> list[str]:
    return ["right", "left"] if f.side == "bilateral" else [f.side]


def draw_frontal(patient: Patient, rng: np.random.Generator, height: int, width: int,
                 annotations: dict | None = None, difficulty: str = "standard") -> np.ndarray:
    """A frontal radiograph (uint8). If `annotations` is a dict it receives boolean masks of what was
    drawn: `pneumothorax` (the air gap, SIIM's segmentation target), `opacity` (airspace opacities, from
    which RSNA's boxes are cut) and `findings`, {finding name: where it was drawn} (the ground-truth sidecar)."""
    level = DIFFICULTIES[difficulty]
    gain, spread = level.finding, level.nuisance
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    fnd = patient.findings
    where: dict[str, np.ndarray] = {}

    def strength(f: Finding) -> float:
        return gain * (0.5 if f.uncertain else 1.0) * (0.6 + 0.2 * f.severity)

    # patient pose and build, which vary far more than any finding does in real radiographs
    dx, dy = rng.normal(0, 0.03 * spread, 2)
    x = x - dx
    y = y - dy
    scale = 1 + rng.uniform(-0.12, 0.12) * spread
    img = np.full((height, width), 0.04, np.float32)
    img += 0.42 * _ellipse(x, y, 0.5, 0.58, 0.47 * scale, 0.62, 0.05)

    # atelectasis pulls the mediastinum towards its side; the heart and trachea follow
    shift = 0.0
    if "Atelectasis" in fnd and fnd["Atelectasis"].side != "bilateral":
        shift = (0.025 if fnd["Atelectasis"].side == "left" else -0.025) * strength(fnd["Atelectasis"])

    # lungs, cut by the diaphragm domes; the depth of inspiration moves both domes
    lung = {}
    emphysema = "Emphysema" in fnd  # hyperinflation: low, flat domes and dark, sparse lungs
    inspiration = rng.normal(0, 0.02 * spread)
    for side, cx in SIDE_X.items():
        dome = 0.76 + inspiration + rng.normal(0, 0.012 * spread) - (0.02 if side == "right" else 0.0)
        if "Atelectasis" in fnd and side in _sides(fnd["Atelectasis"]):
            dome -= 0.03 * strength(fnd["Atelectasis"])
        if emphysema:
            dome += 0.035 * strength(fnd["Emphysema"])
        ellipse = _ellipse(x, y, cx + (0.01 if side == "right" else -0.01), 0.47, 0.16 * scale, 0.32, 0.06)
        below = np.clip((y - (dome - (0.03 if emphysema else 0.09) * ((x - cx) / 0.16) ** 2)) / 0.015, 0, 1)
        lung[side] = ellipse * (1 - below)
    lungs = lung["right"] + lung["left"]
    img -= 0.30 * lungs
    if emphysema:
        img -= 0.06 * strength(fnd["Emphysema"]) * lungs
        where["Emphysema"] = lungs > 0.5

    # lung markings: branching vessels, fading to the periphery; a pneumothorax removes them beyond its
    # pleural line, without darkening the space much (its brightness lies within the nuisance)
    hilum = np.clip(1 - np.abs(np.abs(x - 0.5) - 0.1) / 0.2, 0.2, 1)
    markings = _lines(rng, (height, width), 22, 0.07) * lungs * hilum * (0.4 if emphysema else 1.0)
    marking_mean = float(markings[lungs > 0.5].mean()) if (lungs > 0.5).any() else 0.0
    pneumothorax = np.zeros_like(img)
    for side in _sides(fnd["Pneumothorax"]) if "Pneumothorax" in fnd else []:
        f = fnd["Pneumothorax"]
        cx = SIDE_X[side]
        lateral = 1 if side == "left" else -1
        depth = 0.05 + 0.035 * f.severity
        rx, ry = 0.16 * scale - depth, 0.32 - depth
        # the collapsed lung keeps its medial edge and its base: the gap is apical and lateral
        d = np.sqrt(((x - cx + lateral * depth) / rx) ** 2 + ((y - 0.47 - depth) / ry) ** 2)
        gap = lung[side] * (1 - _soft(d, 0.06))
        pneumothorax = np.maximum(pneumothorax, gap)
        markings = markings * (1 - gap) + 0.5 * marking_mean * gap  # the texture goes, half its brightness stays
        img -= 0.03 * strength(f) * gap
        # the visceral pleura: a line about a pixel wide at the models' resolution ((d - 1) * rx is about the
        # distance from the edge in image widths), thin enough to leave its hemithorax's mean intensity alone
        line = lung[side] * np.exp(-(((d - 1) * rx) / 0.008) ** 2)
        img += 0.2 * strength(f) * line * np.clip(gaussian_filter(gap, 0.015 * height) * 4, 0, 1)  # where air is
    if pneumothorax.any():
        where["Pneumothorax"] = pneumothorax > 0.5
    img += 0.15 * markings

    # heart and mediastinum overlap as one soft-tissue shadow whose density varies from patient to patient;
    # cardiomegaly is a cardiothoracic ratio, not a brightness
    heart_rx = 0.13 * scale * (1 + rng.normal(0, 0.04 * spread))
    if "Cardiomegaly" in fnd:
        heart_rx *= 1 + 0.3 * strength(fnd["Cardiomegaly"])
    heart = _ellipse(x, y, 0.54 + shift, 0.64, heart_rx, 0.115, 0.1)
    med_w = 0.05 * (1 + 0.7 * strength(fnd["Enlarged Cardiomediastinum"]) if "Enlarged Cardiomediastinum" in fnd else 1)
    mediastinum = _soft(np.abs(x - 0.5 - shift) / med_w, 0.3) * _soft(np.abs(y - 0.36) / 0.3, 0.1)
    img += 0.26 * (1 + rng.uniform(-0.3, 0.3) * spread) * np.maximum(heart, mediastinum)
    img += 0.08 * _soft(np.abs(x - 0.5) / 0.025, 0.4)
    if "Cardiomegaly" in fnd:
        where["Cardiomegaly"] = heart > 0.5
    if "Enlarged Cardiomediastinum" in fnd:
        where["Enlarged Cardiomediastinum"] = mediastinum > 0.5

    # ribs: posterior arcs over each hemithorax; a fracture breaks one
    ribs = np.zeros_like(img)
    for side, cx in SIDE_X.items():
        half = np.abs(x - cx) < 0.2
        for k in range(9):
            y0 = 0.17 + 0.068 * k
            arc = y0 + 0.9 * (x - cx) ** 2 + 0.12 * np.abs(x - 0.5)
            band = _soft(np.abs(y - arc) / 0.012, 0.5) * half
            if "Fracture" in fnd and fnd["Fracture"].side == side and k == 4:
                gap_x = cx + (0.1 if side == "left" else -0.1)
                band *= np.clip(np.abs(x - gap_x) / (0.012 * gain), 0, 1)
                where["Fracture"] = (np.abs(x - gap_x) < 0.03) & (np.abs(y - arc) < 0.03)
            ribs += band
    img += 0.07 * np.clip(ribs, 0, 1) * (0.4 + lungs)
    for side in ("right", "left"):
        s = 1 if side == "left" else -1
        clav = 0.12 + 0.075 * s * (x - 0.5)
        img += 0.16 * _soft(np.abs(y - clav) / 0.014, 0.5) * (s * (x - 0.5) > 0.03) * (s * (x - 0.5) < 0.3)

    # parenchymal and pleural findings; `opacity` keeps where airspace opacities were drawn
    opacity = np.zeros_like(img)
    for side in _sides(fnd["Pleural Effusion"]) if "Pleural Effusion" in fnd else []:
        # fluid fills the costophrenic angle up to a meniscus that climbs the chest wall: it has the density of
        # the soft tissue below the dome, so what shows is the lost angle and the curve, not a brightness
        f = fnd["Pleural Effusion"]
        top = {1: 0.71, 2: 0.66, 3: 0.6}[f.severity] + (0.03 if f.uncertain else 0.0)
        lateral = np.abs(x - 0.5) - np.abs(SIDE_X[side] - 0.5)
        fluid = np.clip((y - (top - 0.35 * np.clip(lateral, 0, None))) / 0.01, 0, 1) * lung[side]
        img += 0.3 * min(1.0, gain) * fluid
        where["Pleural Effusion"] = where.get("Pleural Effusion", False) | (fluid > 0.5)
    if "Consolidation" in fnd:  # a lobe filled with fluid: dense, cut sharply by its fissure, air bronchograms
        f = fnd["Consolidation"]
        cy = 0.3 if f.zone == "upper" else 0.6
        fissure = np.clip(((y - cy) * (1 if f.zone == "upper" else -1) + 0.01) / -0.004, 0, 1)
        blob = _ellipse(x, y, SIDE_X[f.side], cy, 0.11, 0.12, 0.4) * fissure * lung[f.side]
        bronchi = _lines(rng, img.shape, 14, 0.05)
        img += 0.22 * strength(f) * blob * (1 - 0.8 * bronchi)
        opacity = np.maximum(opacity, blob)
        where["Consolidation"] = blob > 0.3
    if "Pneumonia" in fnd:  # patchy, mottled opacities in one lung
        f = fnd["Pneumonia"]
        patches = np.zeros_like(img)
        for _ in range(int(rng.integers(3, 6))):
            cx = SIDE_X[f.side] + rng.normal(0, 0.06)
            cy = rng.uniform(0.3, 0.66)
            patches = np.maximum(patches, _ellipse(x, y, cx, cy, 0.04, 0.035, 0.6) * lung[f.side])
        mottle = np.clip((_noise(rng, img.shape, 30) - 0.35) / 0.3, 0, 1)
        img += 0.22 * strength(f) * patches * mottle
        opacity = np.maximum(opacity, patches)
        where["Pneumonia"] = patches > 0.3
    if "COVID-19" in fnd:  # bilateral, peripheral, lower-zone ground glass: a fine mottle at the lung edges
        f = fnd["COVID-19"]
        peripheral = np.clip((np.abs(x - 0.5) - 0.14) / 0.08, 0, 1) * np.clip((y - 0.38) / 0.1, 0, 1)
        ggo = lungs * peripheral
        img += 0.12 * strength(f) * ggo * (0.3 + _texture(_noise(rng, img.shape, 40), height) * 2)
        opacity = np.maximum(opacity, ggo)
        where["COVID-19"] = ggo > 0.3
    if "Infiltration" in fnd:  # nodular texture in the mid zone, at its region's mean intensity
        f = fnd["Infiltration"]
        band = np.clip(1 - np.abs(y - 0.47) / 0.13, 0, 1) * lung[f.side]
        dots = np.clip((_noise(rng, img.shape, 36) - 0.6) / 0.1, 0, 1)
        img += 0.3 * strength(f) * band * _texture(dots, height)
        where["Infiltration"] = band > 0.3
    if "Fibrosis" in fnd:  # a coarse reticular net, worst in the upper zones, at matched mean intensity
        f = fnd["Fibrosis"]
        upper = np.clip((0.55 - y) / 0.15, 0, 1) * lungs
        img += 0.2 * strength(f) * upper * _texture(_lines(rng, img.shape, 30, 0.06), height)
        where["Fibrosis"] = upper > 0.3
    if "Hernia" in fnd:  # hiatal hernia: a retrocardiac gas bubble over a fluid level
        f = fnd["Hernia"]
        bubble = _ellipse(x, y, 0.56, 0.66, 0.05 + 0.01 * f.severity, 0.045, 0.2)
        img += 0.12 * gain * bubble * np.where(y < 0.66, -1.2, 0.6)
        where["Hernia"] = bubble > 0.5
    if "Edema" in fnd:  # perihilar haze and Kerley B lines: short horizontal lines at the lateral bases
        f = fnd["Edema"]
        haze = (_ellipse(x, y, 0.38, 0.47, 0.16, 0.22, 1.0) + _ellipse(x, y, 0.62, 0.47, 0.16, 0.22, 1.0)) * lungs
        edge = np.clip(1 - (0.2 - np.abs(np.abs(x - 0.5) - np.abs(SIDE_X["left"] - 0.5))) / 0.06, 0, 1)
        kerley = _soft(np.abs(np.sin(y * 95.0)) / 0.25, 0.5) * edge * np.clip((y - 0.52) / 0.06, 0, 1) * lungs
        img += 0.08 * strength(f) * haze + 0.2 * strength(f) * kerley
        where["Edema"] = (haze > 0.35) | (kerley > 0.3)
    if "Atelectasis" in fnd:  # a plate-like band above a raised dome, with the mediastinum pulled across
        f = fnd["Atelectasis"]
        plates = np.zeros_like(img)
        for side in _sides(f):
            cx = SIDE_X[side]
            band = _soft(np.abs(y - 0.62 + 0.02 * (x - cx)) / 0.01, 0.5) * _soft(np.abs(x - cx) / 0.09, 0.3)
            plates = np.maximum(plates, band * lung[side])
        img += 0.15 * strength(f) * plates
        where["Atelectasis"] = plates > 0.3
    if "Lung Lesion" in fnd:  # a round, sharp-edged nodule, or a lobulated mass (severity 3)
        f = fnd["Lung Lesion"]
        cy = {"upper": 0.3, "mid": 0.45, "lower": 0.6}[f.zone] + rng.normal(0, 0.02)
        r = 0.05 if f.severity == 3 else 0.016 + 0.008 * f.severity
        cx = SIDE_X[f.side] + rng.normal(0, 0.03)
        lesion = _ellipse(x, y, cx, cy, r, r * width / height, 0.15)
        if f.severity == 3:
            lobe = _ellipse(x, y, cx + 0.6 * r, cy - 0.4 * r, 0.6 * r, 0.6 * r * width / height, 0.15)
            lesion = np.maximum(lesion, lobe)
        img += 0.3 * (0.5 if f.uncertain else 1.0) * gain * lesion
        where["Lung Lesion"] = lesion > 0.5
    if "Pleural Other" in fnd:  # pleural thickening: a rim along the lateral chest wall
        f = fnd["Pleural Other"]
        cx = SIDE_X[f.side]
        rim = np.clip(1 - np.abs(lung[f.side] - 0.3) / 0.3, 0, 1) * (np.abs(x - 0.5) > np.abs(cx - 0.5))
        img += 0.2 * strength(f) * rim
        where["Pleural Other"] = rim > 0.5
    if "Support Devices" in fnd:
        f = fnd["Support Devices"]
        if f.device == "endotracheal tube":
            line = _soft(np.abs(x - 0.5) / 0.006, 0.5) * (y > 0.0) * (y < 0.3)
        elif f.device == "nasogastric tube":
            line = _soft(np.abs(x - 0.49 - 0.12 * np.clip(y - 0.75, 0, None)) / 0.005, 0.5) * (y < 0.9)
        else:  # right internal jugular catheter: down the neck into the superior vena cava
            path = 0.42 + 0.2 * np.clip(0.32 - y, 0, None)
            line = _soft(np.abs(x - path) / 0.005, 0.5) * (y > 0.02) * (y < 0.34)
        img += 0.45 * line
        where["Support Devices"] = line > 0.3

    # soft-tissue shadows (breasts, muscle, skin folds) and uneven exposure: smooth patches over the lungs as
    # bright or dark as a finding, with no edge or texture of their own
    for _ in range(int(rng.integers(2, 6))):
        r = rng.uniform(0.06, 0.14)
        blob = _ellipse(x, y, rng.uniform(0.2, 0.8), rng.uniform(0.25, 0.75), r, r * rng.uniform(0.7, 1.4), 1.0)
        img += rng.uniform(-0.14, 0.14) * spread * blob

    if annotations is not None:
        annotations["pneumothorax"] = pneumothorax > 0.5
        annotations["opacity"] = opacity > 0.3
        annotations["findings"] = {name: mask for name, mask in where.items() if np.any(mask)}
    img = gaussian_filter(img, sigma=0.6 * height / 256)
    # exposure: brightness, contrast, a heel-effect gradient, detector noise and the display curve
    tilt = rng.normal(0, 0.05 * spread, 2)
    img = (img - 0.3) * (1 + rng.uniform(-0.2, 0.2) * spread) + 0.3 + rng.normal(0, 0.04 * spread) \
        + tilt[0] * (x - 0.5) + tilt[1] * (y - 0.5)
    img += rng.normal(0, rng.uniform(0.01, 0.03) * spread, img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** (1 + rng.uniform(-0.25, 0.35) * spread)
    return (img * 255).astype(np.uint8)


def draw_lateral(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A plain lateral view; the harness's pretraining and probes use frontal views only."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    img = 0.04 + 0.4 * _ellipse(x, y, 0.5, 0.55, 0.38, 0.6, 0.05)
    img -= 0.25 * _ellipse(x, y, 0.48, 0.47, 0.22, 0.3, 0.1)
    img += 0.2 * _ellipse(x, y, 0.42, 0.62, 0.12, 0.12, 0.1)
    img += 0.1 * _soft(np.abs(x - 0.8) / 0.04, 0.4)
    img = gaussian_filter(img.astype(np.float32), 0.6 * height / 256) + rng.normal(0, 0.015, img.shape)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8)
