"""Procedural chest radiographs: body, lungs, heart, mediastinum, spine, ribs, clavicles and diaphragm,
with each finding drawn where a radiologist would look for it. Coordinates are fractions of the image;
x grows to the image right, which is the patient's left (radiographs are viewed facing the patient)."""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from bench.data.synth.findings import Finding, Patient

SIDE_X = {"right": 0.29, "left": 0.71}  # lung centres by the patient's side


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


def _sides(f: Finding) -> list[str]:
    return ["right", "left"] if f.side == "bilateral" else [f.side]


def draw_frontal(patient: Patient, rng: np.random.Generator, height: int, width: int,
                 annotations: dict | None = None) -> np.ndarray:
    """A frontal radiograph (uint8). If `annotations` is a dict it receives boolean masks of what was
    drawn: `pneumothorax` (the air gap, SIIM's segmentation target) and `opacity` (airspace opacities,
    from which RSNA's boxes are cut)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y /= height
    x /= width
    fnd = patient.findings

    def strength(f: Finding) -> float:
        return (0.5 if f.uncertain else 1.0) * (0.6 + 0.2 * f.severity)

    # patient pose and build, which vary far more than any finding does in real radiographs
    dx, dy = rng.normal(0, 0.03, 2)
    x = x - dx
    y = y - dy
    scale = rng.uniform(0.88, 1.12)
    img = np.full((height, width), 0.04, np.float32)
    img += 0.42 * _ellipse(x, y, 0.5, 0.58, 0.47 * scale, 0.62, 0.05)

    # lungs, cut by the diaphragm domes; atelectasis raises its hemidiaphragm
    lung = {}
    emphysema = "Emphysema" in fnd  # hyperinflation: low, flat domes and dark, sparse lungs
    for side, cx in SIDE_X.items():
        dome = 0.76 + rng.normal(0, 0.01) - (0.02 if side == "right" else 0.0)  # liver lifts the right dome
        if "Atelectasis" in fnd and side in _sides(fnd["Atelectasis"]):
            dome -= 0.045 * strength(fnd["Atelectasis"])
        if emphysema:
            dome += 0.03 * strength(fnd["Emphysema"])
        ellipse = _ellipse(x, y, cx + (0.01 if side == "right" else -0.01), 0.47, 0.16 * scale, 0.32, 0.06)
        below = np.clip((y - (dome - (0.04 if emphysema else 0.09) * ((x - cx) / 0.16) ** 2)) / 0.015, 0, 1)
        lung[side] = ellipse * (1 - below)
    lungs = lung["right"] + lung["left"]
    img -= (0.38 if emphysema else 0.30) * lungs

    # lung markings; a pneumothorax removes them and darkens the collapsed space
    markings = _noise(rng, (height, width), 24) * lungs * (0.5 if emphysema else 1.0)
    pneumothorax = np.zeros_like(img)
    for side in _sides(fnd["Pneumothorax"]) if "Pneumothorax" in fnd else []:
        f = fnd["Pneumothorax"]
        cx = SIDE_X[side]
        lateral = 1 if side == "left" else -1
        depth = 0.03 + 0.025 * f.severity
        inner = _ellipse(x, y, cx - lateral * depth * 0.8, 0.47 + depth, 0.16 * scale - depth, 0.32 - depth, 0.04)
        gap = lung[side] * (1 - inner)
        pneumothorax = np.maximum(pneumothorax, gap)
        markings *= 1 - gap
        img -= 0.10 * strength(f) * gap
        img += 0.18 * strength(f) * lung[side] * np.clip(1 - np.abs(inner - 0.5) / 0.5, 0, 1) ** 4
    img += 0.07 * markings

    # heart and mediastinum overlap as one soft-tissue shadow; the spine shows through faintly
    heart_rx = 0.115 * (1 + 0.18 * strength(fnd["Cardiomegaly"]) if "Cardiomegaly" in fnd else 1) * scale
    heart = _ellipse(x, y, 0.54, 0.64, heart_rx, 0.115, 0.1)
    med_w = 0.055 * (1 + 0.6 * strength(fnd["Enlarged Cardiomediastinum"])
                     if "Enlarged Cardiomediastinum" in fnd else 1)
    mediastinum = _soft(np.abs(x - 0.5) / med_w, 0.3) * _soft(np.abs(y - 0.36) / 0.3, 0.1)
    img += 0.26 * np.maximum(heart, mediastinum)
    img += 0.08 * _soft(np.abs(x - 0.5) / 0.025, 0.4)

    # ribs: posterior arcs over each hemithorax; a fracture breaks one
    ribs = np.zeros_like(img)
    for side, cx in SIDE_X.items():
        half = np.abs(x - cx) < 0.2
        for k in range(9):
            y0 = 0.17 + 0.068 * k
            arc = y0 + 0.9 * (x - cx) ** 2 + 0.12 * np.abs(x - 0.5)
            band = _soft(np.abs(y - arc) / 0.012, 0.5) * half
            if "Fracture" in fnd and fnd["Fracture"].side == side and k == 4:
                band *= np.clip(np.abs(x - (cx + (0.1 if side == "left" else -0.1))) / 0.012, 0, 1)
            ribs += band
    img += 0.07 * np.clip(ribs, 0, 1) * (0.4 + lungs)
    for side in ("right", "left"):
        s = 1 if side == "left" else -1
        clav = 0.12 + 0.075 * s * (x - 0.5)
        img += 0.16 * _soft(np.abs(y - clav) / 0.014, 0.5) * (s * (x - 0.5) > 0.03) * (s * (x - 0.5) < 0.3)

    # parenchymal and pleural findings; `opacity` keeps where airspace opacities were drawn
    opacity = np.zeros_like(img)
    for side in _sides(fnd["Pleural Effusion"]) if "Pleural Effusion" in fnd else []:
        f = fnd["Pleural Effusion"]
        level = {1: 0.68, 2: 0.61, 3: 0.53}[f.severity]
        lateral = np.abs(x - 0.5) - np.abs(SIDE_X[side] - 0.5)
        fluid = np.clip((y - (level - 0.25 * np.clip(lateral, 0, None))) / 0.02, 0, 1) * lung[side]
        img += 0.38 * (0.5 if f.uncertain else 1.0) * fluid
    if "Consolidation" in fnd:
        f = fnd["Consolidation"]
        cy = 0.3 if f.zone == "upper" else 0.6
        blob = _ellipse(x, y, SIDE_X[f.side], cy, 0.09, 0.08, 0.5) * (0.6 + 0.4 * _noise(rng, img.shape, 12))
        img += 0.32 * strength(f) * blob * lung[f.side]
        opacity = np.maximum(opacity, blob * lung[f.side])
    if "Pneumonia" in fnd:
        f = fnd["Pneumonia"]
        for _ in range(int(rng.integers(3, 6))):
            cx = SIDE_X[f.side] + rng.normal(0, 0.06)
            cy = rng.uniform(0.3, 0.66)
            patch = _ellipse(x, y, cx, cy, 0.035, 0.03, 0.8) * lung[f.side]
            img += 0.2 * strength(f) * patch
            opacity = np.maximum(opacity, patch)
    if "COVID-19" in fnd:  # bilateral, peripheral, lower-zone ground glass
        f = fnd["COVID-19"]
        peripheral = np.clip((np.abs(x - 0.5) - 0.14) / 0.08, 0, 1) * np.clip((y - 0.38) / 0.1, 0, 1)
        ggo = lungs * peripheral * (0.4 + 0.6 * _noise(rng, img.shape, 10))
        img += 0.2 * strength(f) * ggo
        opacity = np.maximum(opacity, ggo)
    if "Infiltration" in fnd:
        f = fnd["Infiltration"]
        band = np.clip(1 - np.abs(y - 0.47) / 0.13, 0, 1)
        patches = np.clip((_noise(rng, img.shape, 16) - 0.45) / 0.2, 0, 1) * band * lung[f.side]
        img += 0.22 * strength(f) * patches
    if "Fibrosis" in fnd:  # a fine reticular net, worst in the upper zones
        f = fnd["Fibrosis"]
        net = _soft(np.abs(_noise(rng, img.shape, 40) - 0.5) / 0.05, 0.5) * np.clip((0.55 - y) / 0.15, 0, 1)
        img += 0.14 * strength(f) * net * lungs
    if "Hernia" in fnd:  # hiatal hernia: a retrocardiac gas bubble over a fluid level
        f = fnd["Hernia"]
        bubble = _ellipse(x, y, 0.56, 0.66, 0.05 + 0.01 * f.severity, 0.045, 0.2)
        img += 0.1 * bubble * np.where(y < 0.66, -1.2, 0.6)
    if "Edema" in fnd:
        f = fnd["Edema"]
        haze = _ellipse(x, y, 0.38, 0.47, 0.16, 0.22, 1.0) + _ellipse(x, y, 0.62, 0.47, 0.16, 0.22, 1.0)
        img += 0.20 * strength(f) * haze * lungs
    if "Atelectasis" in fnd:
        f = fnd["Atelectasis"]
        for side in _sides(f):
            cx = SIDE_X[side]
            band = _soft(np.abs(y - 0.63 + 0.02 * (x - cx)) / 0.012, 0.5) * _soft(np.abs(x - cx) / 0.08, 0.3)
            img += 0.22 * strength(f) * band * lung[side]
    if "Lung Lesion" in fnd:
        f = fnd["Lung Lesion"]
        cy = {"upper": 0.3, "mid": 0.45, "lower": 0.6}[f.zone]
        r = 0.055 if f.severity == 3 else 0.01 + 0.007 * f.severity  # severity 3: a mass (> 3 cm)
        cx = SIDE_X[f.side] + rng.normal(0, 0.03)
        img += 0.35 * (0.5 if f.uncertain else 1.0) * _ellipse(x, y, cx, cy + rng.normal(0, 0.02), r, r * width / height, 0.3)
    if "Pleural Other" in fnd:
        f = fnd["Pleural Other"]
        cx = SIDE_X[f.side]
        rim = np.clip(1 - np.abs(lung[f.side] - 0.35) / 0.35, 0, 1) * (np.abs(x - 0.5) > np.abs(cx - 0.5))
        img += 0.18 * strength(f) * rim
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

    if annotations is not None:
        annotations["pneumothorax"] = pneumothorax > 0.5
        annotations["opacity"] = opacity > 0.3
    img = gaussian_filter(img, sigma=0.6 * height / 256)
    # exposure: brightness, contrast, a heel-effect gradient, detector noise and the display curve
    tilt = rng.normal(0, 0.05, 2)
    img = (img - 0.3) * rng.uniform(0.8, 1.2) + 0.3 + rng.normal(0, 0.04) + tilt[0] * (x - 0.5) + tilt[1] * (y - 0.5)
    img += rng.normal(0, rng.uniform(0.01, 0.03), img.shape).astype(np.float32)
    img = np.clip(img, 0, 1) ** rng.uniform(0.75, 1.35)
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
