"""Fixtures of the image robustness tests: sklearn's digits and a small CNN trained on the first 600 of them
(built once per test file: the same seed and settings everywhere, so every file attacks the same model)."""

from __future__ import annotations

import numpy as np
import pytest

from fmaudit.data import Dataset, load_digits


def train_digits_cnn(digits: Dataset):
    from fmaudit.targets import load_target
    from fmaudit.training import TrainConfig, train

    target = load_target(model="bundled:digits-cnn", name="cnn")
    train(target, digits.subset(np.arange(600)), TrainConfig(epochs=4, batch_size=32, lr=3e-3, seed=0))
    return target


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_digits()


@pytest.fixture(scope="module")
def cnn(digits):
    return train_digits_cnn(digits)
