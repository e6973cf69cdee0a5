# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A continuous normalising flow on two moons
#
# A continuous normalising flow (FFJORD) transports a standard Gaussian into the data distribution
# along an ODE $\frac{dz}{dt} = f_\theta(t, z)$. The log-density follows from the instantaneous change
# of variables,
# $\log p(x) = \log \mathcal N(z(0); 0, I) - \int_0^{1} \operatorname{tr}\frac{\partial f_\theta}{\partial z}\,dt$,
# solved backwards from $z(1) = x$ together with the trace integral. In two dimensions the trace is
# computed exactly. We fit `nde.models.CNF` to the two-moons density by maximum likelihood and report
# the log-likelihood on held-out points.
#
# **Target:** a test log-likelihood above -1.8 nats, against -2.70 for the best single Gaussian
# (measured: -1.60 after 500 training steps of about 8 s on one CPU thread; the earlier setting, adaptive
# Tsit5 at `rtol=1e-4` for 600 steps, reached -1.87 in 26 s).

# %%
import os
import sys
import time

import matplotlib

if "ipykernel" not in sys.modules:  # as a script, write figures to files; in a notebook, show them inline
    matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import make_moons

torch.set_num_threads(1)

import nde
from nde.models import CNF

torch.manual_seed(0)
FIGURES = os.environ.get("NDE_FIGURES", "figures")
os.makedirs(FIGURES, exist_ok=True)


def moons(n, seed):
    x, _ = make_moons(n, noise=0.05, random_state=seed)
    x = torch.tensor(x, dtype=torch.float32)
    return (x - torch.tensor([0.5, 0.25])) * 1.5


train, test = moons(20000, 0), moons(2000, 1)

# %% [markdown]
# The vector field is an MLP on $[z, t]$ with two hidden layers of 64 softplus units. For training,
# the flow is solved with two fixed RK4 steps (`dt0=0.5`, eight evaluations a solve: a cost known in
# advance) and differentiated directly; for larger models pass `adjoint=nde.BacksolveAdjoint()` or
# `nde.CheckpointAdjoint()` to bound memory. The learned field stays smooth, so the coarse solve is
# accurate; the test log-likelihood is computed with an adaptive Dopri5 solve at `rtol=1e-6` all the same.

# %%
cnf = CNF(2, width=64, depth=2, solver=nde.solvers.RK4(), dt0=0.5)
steps = 500
opt = torch.optim.Adam(cnf.parameters(), lr=1e-2)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
start = time.perf_counter()
for step in range(steps):
    batch = train[torch.randint(0, len(train), (256,))]
    loss = -cnf.log_prob(batch).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % 100 == 0:
        print(f"step {step:4d}  train NLL {loss.item():.3f}")
print(f"training took {time.perf_counter() - start:.0f} s")

# %%
# the trained vector field, solved accurately
accurate = CNF(2, vector_field=cnf.vector_field, solver=nde.solvers.Dopri5(), rtol=1e-6, atol=1e-8)
with torch.no_grad():
    test_ll = accurate.log_prob(test).mean().item()
    gauss = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    gauss_ll = gauss.log_prob(test).mean().item()
print(f"test log-likelihood: CNF {test_ll:.3f} nats, best single Gaussian {gauss_ll:.3f} nats")
assert test_ll > -1.8 and test_ll > gauss_ll + 0.5, (test_ll, gauss_ll)

# %% [markdown]
# The learned density, and samples pushed forward through the flow:

# %%
with torch.no_grad():
    g = torch.linspace(-2.5, 2.5, 120)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    grid = torch.stack([X.reshape(-1), Y.reshape(-1)], -1)
    dens = cnf.log_prob(grid).exp().reshape(120, 120)
    samples = cnf.sample(2000)
fig, ax = plt.subplots(1, 3, figsize=(12, 4))
ax[0].scatter(test[:, 0], test[:, 1], s=2)
ax[0].set_title("data")
ax[1].imshow(dens, origin="lower", extent=(-2.5, 2.5, -2.5, 2.5))
ax[1].set_title("learned density")
ax[2].scatter(samples[:, 0], samples[:, 1], s=2, color="C1")
ax[2].set_title("samples")
for a in ax:
    a.set_xlim(-2.5, 2.5)
    a.set_ylim(-2.5, 2.5)
    a.set_aspect("equal")
fig.tight_layout()
fig.savefig(os.path.join(FIGURES, "cnf_moons.png"), dpi=80)
print(f"final test log-likelihood {test_ll:.3f}")
