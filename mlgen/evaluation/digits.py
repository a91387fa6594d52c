"""Scores generated digits with a classifier trained on real digits (scikit-learn).

- ``confidence``: mean top-class probability of the classifier on the samples;
- ``accuracy``: share of class-conditional samples classified as the class they were asked
  for;
- ``frechet``: Fréchet distance between Gaussians fitted to the classifier's features (its
  32 PCA components) of the samples and of the real held-out digits (the validation split
  the diffusion model never trained on);
- ``frechet_floor``: the same distance between as many real *training* digits and the
  held-out ones: what a perfect generator would score at this sample size.

The classifier (PCA to 32 components, then an RBF SVM with Platt probabilities, fitted on
the training split at the model's image size in ~2 s) scores ~99-100% on the held-out
digits (``classifier_accuracy``).

``mlgen eval WORKDIR [--num N --steps S --sampler NAME --guidance G --seed S]`` (in
``mlgen.cli.sample``) samples a trained run and prints the scores as one JSON line (also written
to ``WORKDIR/eval.json``).
"""

from __future__ import annotations

import functools

import numpy as np
from scipy import linalg
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

from mlgen.data.images import ImageDataConfig, load_arrays

__all__ = ["DigitScorer", "frechet_distance", "scorer"]


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^(1/2))`` of features ``[n, d]``."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    eye = 1e-6 * np.eye(a.shape[1])  # keeps sqrtm stable for near-singular covariances
    ca, cb = np.cov(a, rowvar=False) + eye, np.cov(b, rowvar=False) + eye
    covmean = linalg.sqrtm(ca @ cb)
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(ca + cb - 2.0 * covmean))


class DigitScorer:
    """A digits classifier fitted on the training split at ``image_size``."""

    def __init__(self, image_size: int = 16, *, val_fraction: float = 0.1, seed: int = 0):
        cfg = ImageDataConfig(source="digits", image_size=image_size, val_fraction=val_fraction)
        self.train_x, self.train_y = load_arrays(cfg, "train")
        self.val_x, self.val_y = load_arrays(cfg, "validation")
        # Probabilities from an SVM calibrated by cross-validation (what SVC(probability=True) did,
        # which scikit-learn 1.9 deprecates).
        svm = CalibratedClassifierCV(SVC(C=10.0, random_state=seed), ensemble=False)
        self.clf = make_pipeline(PCA(32, random_state=seed), svm)
        self.clf.fit(self._flat(self.train_x), self.train_y)
        self.classifier_accuracy = float(self.clf.score(self._flat(self.val_x), self.val_y))
        self.seed = seed

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, np.float32)
        return images.reshape(len(images), -1)

    def features(self, images: np.ndarray) -> np.ndarray:
        """The classifier's features ``[n, 32]`` (its PCA projection)."""
        return self.clf[0].transform(self._flat(images))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.clf.predict_proba(self._flat(images))

    def score(self, images: np.ndarray, labels: np.ndarray | None = None) -> dict[str, float]:
        """Scores samples ``[n, H, W, 1]`` in [-1, 1] (and the labels they were asked for)."""
        images = np.clip(np.asarray(images, np.float32), -1.0, 1.0)
        p = self.probabilities(images)
        out = {
            "num_samples": len(images),
            "confidence": float(p.max(1).mean()),
            "classifier_accuracy": self.classifier_accuracy,
        }
        if labels is not None:
            out["accuracy"] = float((p.argmax(1) == np.asarray(labels)).mean())
        real = self.features(self.val_x)
        out["frechet"] = frechet_distance(self.features(images), real)
        rng = np.random.default_rng(self.seed)
        idx = rng.choice(len(self.train_x), size=min(len(images), len(self.train_x)), replace=False)
        out["frechet_floor"] = frechet_distance(self.features(self.train_x[idx]), real)
        out["real_confidence"] = float(self.probabilities(self.val_x).max(1).mean())
        return out


@functools.lru_cache(maxsize=4)
def scorer(image_size: int = 16) -> DigitScorer:
    return DigitScorer(image_size)
