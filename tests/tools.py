"""The programs outside Python that some tests run: kubectl, promtool, Chromium, docker-compose.

Where one is missing a test skips, saying which and how to get it, so a bare `make test` still runs everything
else. CI must not pass that way: `.ci/run` installs them and sets PRICEWIRE_REQUIRE_TOOLS=1, under which a missing
program fails the test instead.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

REQUIRE_TOOLS = os.environ.get("PRICEWIRE_REQUIRE_TOOLS", "") == "1"
"""Set by .ci/run: a test that needs a missing program fails instead of skipping."""


def missing(reason: str) -> NoReturn:
    """Skip the current test for `reason` (a program it needs is not installed); fail it under REQUIRE_TOOLS."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{reason}, and PRICEWIRE_REQUIRE_TOOLS=1 requires it", pytrace=False)
    pytest.skip(reason)


def require(path: str | None, reason: str) -> str:
    """`path` (a program's, from shutil.which), or `missing(reason)` when there is none."""
    if path is None:
        missing(reason)
    return path
