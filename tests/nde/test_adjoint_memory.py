"""Peak memory of every adjoint at 100 and 1000 steps, measured in fresh subprocesses (peak RSS).

The same process first runs 100 steps, then 1000: the high-water mark of the resident set after each
run is that run's peak. DirectAdjoint stores every step's graph, so it must grow about linearly; that
it does proves the measurement can tell the adjoints apart.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import torch
import nde
from nde.solvers import RK4, ReversibleHeun
torch.set_num_threads(1)
torch.manual_seed(0)
kind = sys.argv[1]
net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64), torch.nn.Tanh(),
                          torch.nn.Linear(64, 32))
y0 = torch.randn(64, 32, requires_grad=True)
adjoint = {"direct": nde.DirectAdjoint(), "checkpoint": nde.CheckpointAdjoint(),
           "backsolve": nde.BacksolveAdjoint(), "reversible": nde.ReversibleAdjoint()}[kind]
solver = ReversibleHeun() if kind == "reversible" else RK4()

def run(n):
    sol = nde.solve(lambda t, y: net(y), solver, 0.0, 1.0, y0, dt0=1.0 / n, adjoint=adjoint)
    (sol.ys ** 2).sum().backward()

def peak_mb():
    # VmHWM: the resident-set high-water mark of this process (ru_maxrss would be inherited at fork)
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0

run(10)
base = peak_mb()
run(100)
p100 = peak_mb()
run(1000)
p1000 = peak_mb()
print(json.dumps({"base": base, "p100": p100, "p1000": p1000}))
"""


def _measure(kinds):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {k: subprocess.Popen([sys.executable, "-c", SCRIPT, k], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 env=env, text=True) for k in kinds}
    out = {}
    for k, p in procs.items():
        so, se = p.communicate(timeout=300)
        assert p.returncode == 0, se
        out[k] = json.loads(so.strip().splitlines()[-1])
    return out


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_peak_memory_scaling():
    m = _measure(["direct", "checkpoint", "backsolve", "reversible"])
    grow = {k: (v["p1000"] - v["base"], v["p100"] - v["base"]) for k, v in m.items()}
    # direct: storing every step's graph; must grow by tens of MB (linear)
    d1000, d100 = grow["direct"]
    assert d1000 > 40 and d1000 > 4 * max(d100, 1.0), m
    # O(1) in the number of steps: peak at 1000 steps within 1.15x of the peak at 100 steps
    for k in ("backsolve", "reversible"):
        assert m[k]["p1000"] <= 1.15 * m[k]["p100"], (k, m)
        assert grow[k][0] < 0.15 * d1000, (k, m)
    # checkpointing: sublinear (about sqrt(2 n) stored states)
    assert grow["checkpoint"][0] < 0.25 * d1000, m
