import os

import pytest
import torch

# one thread per test process: the suite runs under xdist on 2 cores, and oversubscribed torch
# threads spin and slow everything down by an order of magnitude
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
