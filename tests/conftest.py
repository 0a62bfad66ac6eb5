"""Test collection and the hypothesis seed.

``tests/mpi`` runs only under mpiexec (``tests/test_distributed.py`` launches it).

Every run of the suite uses one hypothesis seed for all property tests, printed in the pytest
header: ``--hypothesis-seed=N`` when given, else a fresh random one. A failure in CI therefore
reproduces with ``python -m pytest --hypothesis-seed=N`` (plus hypothesis's own printed
``@reproduce_failure`` blob, enabled below).
"""

import os
import random

import pytest
from hypothesis import settings

collect_ignore = [] if os.environ.get("LONGNET_REF_MPI") == "1" else ["mpi"]

SEED_KEY = pytest.StashKey[object]()

# No deadline for any property test: CI shares 2 cores, and a slow example is not a wrong one.
settings.register_profile("longnet_ref", print_blob=True, deadline=None)
settings.load_profile("longnet_ref")


def pytest_configure(config):
    from hypothesis import core

    seed = config.getoption("hypothesis_seed", None)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
        core.global_force_seed = seed  # what --hypothesis-seed=N would have set
    config.stash[SEED_KEY] = seed


def pytest_report_header(config):
    seed = config.stash.get(SEED_KEY, None)
    return f"hypothesis seed: {seed} (reproduce with: python -m pytest --hypothesis-seed={seed})"


@pytest.fixture
def attention_calls(monkeypatch):
    """The ``(function, backend)`` of every call the layers make to the dilated attention, forward
    and backward: ``nn``'s two entry points wrapped to record their ``backend=`` and then run."""
    from longnet_ref import nn

    calls = []
    for name in ("dilated_attention", "dilated_attention_backward"):
        real = getattr(nn, name)
        monkeypatch.setattr(nn, name, lambda *a, _real=real, _name=name, **kw: calls.append((_name, kw["backend"])) or _real(*a, **kw))
    return calls
