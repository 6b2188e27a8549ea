"""mergelab.validate: the one hyperparameter validator."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf

from mergelab import validate
from mergelab.errors import ConfigError


def test_integer():
    assert validate.integer("n", 3) == 3
    assert validate.integer("n", 4.0) == 4 and type(validate.integer("n", 4.0)) is int
    assert validate.integer("n", np.int64(2)) == 2
    assert validate.integer("n", 0, minimum=0) == 0
    assert validate.integer("n", None, optional=True) is None
    for bad in (0, 2.5, True, "3", None, float("inf")):
        with pytest.raises(ConfigError, match=r"^n must be an integer >= 1, got "):
            validate.integer("n", bad)
    with pytest.raises(ConfigError, match=r"must be an integer >= 2 or null, got 1$"):
        validate.integer("n", 1, minimum=2, optional=True)


def test_number():
    assert validate.number("lr", 1e-3, gt=0) == 1e-3
    assert validate.number("wd", 0, ge=0) == 0.0
    assert validate.number("x", None, optional=True) is None
    with pytest.raises(ConfigError, match=r"^lr must be > 0 \(a finite number\), got 0$"):
        validate.number("lr", 0, gt=0)
    with pytest.raises(ConfigError, match=r"^p must be > 0 and <= 1 \(a finite number\), got 1.5$"):
        validate.number("p", 1.5, gt=0, le=1)
    for bad in (float("nan"), "0.1", False):
        with pytest.raises(ConfigError, match="lr must be > 0"):
            validate.number("lr", bad, gt=0)


def test_fraction_choice_betas():
    assert validate.fraction("k", 0) == 0.0 and validate.fraction("k", 1) == 1.0
    with pytest.raises(ConfigError, match=r"k must be a fraction in \(0, 1\], got 0$"):
        validate.fraction("k", 0, open_low=True)
    with pytest.raises(ConfigError, match=r"p must be a fraction in \[0, 1\), got 1$"):
        validate.fraction("p", 1, open_high=True)
    assert validate.choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ConfigError, match=r"^mode must be one of a, b; got 'c'$"):
        validate.choice("mode", "c", ("a", "b"))
    assert validate.betas("betas", OmegaConf.create([0.9, 0.999])) == (0.9, 0.999)
    for bad in ([0.9], [0.9, 1.0], "ab", 0.9):
        with pytest.raises(ConfigError, match="betas"):
            validate.betas("betas", bad)
