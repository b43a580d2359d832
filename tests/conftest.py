"""Test session setup shared by all test files."""

from __future__ import annotations

import os

import torch


def pytest_configure(config):
    """Under pytest-xdist, give each worker its share of the cores.

    Every worker defaults to all cores; with ``-n 2`` on 2 cores the OpenMP pools of the two workers
    then fight for the same cores and dense SVDs / convolutions run many times slower.
    """
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(workers)))
