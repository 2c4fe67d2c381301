"""The benchmark's sensitivity in seconds: on the standard synthetic findings, the image tower trained on a few
hundred labelled images finds a finding far better than the same tower's random features do (the full check,
with CLIP and the controls on the five datasets, is `bench suite controls`)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from bench.data.images import resize_and_pad
from bench.data.synth.drawing import draw_frontal
from bench.data.synth.findings import Finding, sample_patient
from bench.experiment.config import compose_config
from bench.modeling.towers import VisionTower

SIZE = 64


def _images(finding: str, n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """`n` radiographs of the population, half of them with `finding` (left or right, any severity) added."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(n):
        patient = sample_patient(rng)
        patient.findings.pop(finding, None)
        if i % 2:
            patient.findings[finding] = Finding(finding, str(rng.choice(["left", "right"])), "upper",
                                                int(rng.integers(1, 4)))
        square = resize_and_pad(draw_frontal(patient, rng, 80, 72), SIZE)
        images.append(torch.from_numpy(square).float().div(255).sub(0.5).div(0.25).expand(3, -1, -1))
        labels.append(i % 2)
    return torch.stack(images), np.array(labels)


def _probe_auc(tower: VisionTower, train, test) -> float:
    with torch.no_grad():
        tower.eval()
        x_train, x_test = (tower(images)[0].numpy() for images, _ in (train, test))
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x_train, train[1])
    return float(roc_auc_score(test[1], clf.predict_proba(x_test)[:, 1]))


@pytest.mark.parametrize("finding", ["Consolidation"])
def test_trained_features_find_a_finding_better_than_random_features(finding):
    torch.manual_seed(0)
    cfg = compose_config("supervised", overrides=[f"model.image.image_size={SIZE}", "model.image.patch_size=8"])
    train, test = _images(finding, 256, 1), _images(finding, 160, 2)
    tower = VisionTower(cfg.model.image)
    random_auc = _probe_auc(tower, train, test)

    head = torch.nn.Linear(tower.width, 1)
    optimiser = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=3e-4)
    labels = torch.from_numpy(train[1]).float()
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        tower.train()
        rows = torch.randint(0, len(labels), (32,), generator=generator)
        loss = F.binary_cross_entropy_with_logits(head(tower(train[0][rows])[0]).squeeze(1), labels[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    trained_auc = _probe_auc(tower, train, test)
    assert trained_auc > random_auc + 0.1, (random_auc, trained_auc)
