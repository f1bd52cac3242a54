"""Fixtures: tiny random models of every supported architecture, and batches to run them on."""

from __future__ import annotations

import pytest

import circuits
from circuits.testing import ARCHITECTURES, tiny_hf, tiny_pair


@pytest.fixture(scope="session", params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny(arch) -> circuits.Model:
    return circuits.Model.from_hf(tiny_hf(arch), name=f"tiny-{arch}")


@pytest.fixture(scope="session")
def pair():
    return tiny_pair()
