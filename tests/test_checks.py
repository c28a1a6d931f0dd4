"""The shared input checks of mbdl.functional.checks."""

from __future__ import annotations

import math

import pytest

from mbdl.functional.checks import check_number


@pytest.mark.parametrize(
    ("bounds", "good", "bad", "message"),
    [
        ({}, (-3.0, 0.0, 2.5), (math.nan, math.inf, -math.inf), "m must be a finite number; got"),
        (
            {"minimum": 0},
            (0.0, 1e-9, 7.0),
            (-1e-9, math.inf, math.nan),
            "m must be a finite number >= 0; got",
        ),
        (
            {"above": 0},
            (1e-9, 7.0),
            (0.0, -1.0, math.inf, math.nan),
            "m must be a finite number > 0; got",
        ),
    ],
)
def test_check_number_accepts_and_refuses_with_one_message(bounds, good, bad, message):
    for value in good:
        check_number("m", value, **bounds)
    for value in bad:
        with pytest.raises(ValueError, match=f"^{message} {value}$"):
            check_number("m", value, **bounds)
