"""Neural SDE models learn: LatentSDE (ELBO with the KL path term), SDE-GAN (marginal distances)."""

import math

import pytest
import torch

import nde
from nde.models.neural_sde import CDEDiscriminator, LatentSDE, NeuralSDE, SDEGAN, ornstein_uhlenbeck


@pytest.fixture(autouse=True)
def _one_thread():
    # small models: one thread avoids oversubscription when the suite runs in parallel
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _w1(a, b):
    a, _ = a.flatten().sort()
    b, _ = b.flatten().sort()
    return (a - b).abs().mean().item()


def test_neural_sde_shapes_seed_and_gradients():
    torch.manual_seed(0)
    for noise, kind in (("diagonal", "ito"), ("general", "stratonovich")):
        model = NeuralSDE(3, brownian_size=2, width=16, depth=1, noise=noise, sde_type=kind, dt=0.1)
        y0 = torch.randn(8, 3)
        ts = torch.linspace(0, 1, 5)
        a = model(y0, ts, seed=1)
        b = model(y0, ts, seed=1)
        c = model(y0, ts, seed=2)
        assert a.shape == (5, 8, 3)
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
        a[-1].pow(2).sum().backward()
        assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="noise"):
        NeuralSDE(3, noise="scalar")


def test_neural_sde_fits_ou_drift():
    # learn the mean reversion of an OU process by matching marginal means and variances
    torch.manual_seed(0)
    ts = torch.linspace(0, 1, 6)
    data = ornstein_uhlenbeck(512, ts, theta=2.0, mu=0.5, sigma=0.4, y0_std=0.0, seed=3)
    model = NeuralSDE(1, width=16, depth=1, dt=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    y0 = torch.zeros(256, 1)

    def loss_fn():
        ys = model(y0, ts)
        return ((ys.mean(1) - data.mean(1)) ** 2).sum() + ((ys.std(1) - data.std(1)) ** 2).sum()

    first = loss_fn().item()
    for _ in range(150):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = loss_fn().item()
    print(f"neural SDE marginal-moment loss: {first:.4f} -> {final:.5f}")
    assert final < 0.02 and final < 0.1 * first, (first, final)


def test_latent_sde_learns_noisy_ou_trajectories():
    torch.manual_seed(0)
    ts = torch.linspace(0, 1, 11)
    gen = torch.Generator().manual_seed(2)
    data = ornstein_uhlenbeck(256, ts, seed=1) + 0.05 * torch.randn(11, 256, 1, generator=gen)
    model = LatentSDE(1, latent_size=2, context_size=8, hidden_size=16, obs_noise=0.05, dt=0.05)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = model(data[:, :64], ts)["elbo"].item()
    for it in range(150):
        idx = torch.randint(0, 256, (64,))
        out = model(data[:, idx], ts)
        kl_weight = min(1.0, it / 75)
        loss = -(out["log_px"] - kl_weight * (out["kl_z0"] + out["kl_path"]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(data, ts)
    baseline = ((data - data.mean(1, keepdim=True)) ** 2).mean().item()
    mse = ((out["xs_hat"] - data) ** 2).mean().item()
    print(f"latent SDE: ELBO {start:.1f} -> {out['elbo'].item():.1f}, recon MSE {mse:.4f} (baseline {baseline:.4f})")
    assert out["elbo"].item() > -80 and out["elbo"].item() > start + 1000
    assert out["kl_path"].item() >= 0 and out["kl_z0"].item() >= 0
    assert mse < 0.6 * baseline
    samples = model.sample(ts, 32)
    assert samples.shape == (11, 32, 1) and torch.isfinite(samples).all()


def test_kl_path_term_matches_sdeint_logqp():
    # the model's KL path term is the logqp integral of nde.sdeint on the same posterior/prior pair
    torch.manual_seed(0)
    model = LatentSDE(1, latent_size=2, context_size=4, hidden_size=8, dt=0.1).double()
    ts = torch.linspace(0, 1, 3, dtype=torch.float64)
    xs = torch.randn(3, 5, 1, dtype=torch.float64)
    ctx, mean, logstd = model.encode(xs, ts)

    class Pair:
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, z):
            return model.posterior_drift(t, z, ctx)

        def h(self, t, z):
            return model.prior_drift(t, z)

        def g(self, t, z):
            return model.diffusion(t, z)

    bm = nde.BrownianInterval(0.0, 1.0, (5, 3), seed=4, dtype=torch.float64, dt=0.1)
    z0 = mean.detach()
    _, log_ratio = nde.sdeint(Pair(), z0, ts, bm=bm, method="euler", dt=0.1, logqp=True)
    from nde.models.neural_sde import _Augmented

    aug = _Augmented(model, ctx)
    terms = nde.MultiTerm(nde.ODETerm(aug.drift), nde.ControlTerm(aug.diffusion, bm, noise="diagonal"))
    zl0 = torch.cat([z0, torch.zeros(5, 1, dtype=torch.float64)], -1)
    sol = nde.solve(terms, nde.solvers.EulerMaruyama(), 0.0, 1.0, zl0, dt0=0.1)
    torch.testing.assert_close(sol.ys[-1][:, -1], log_ratio.sum(0), rtol=1e-10, atol=1e-12)


def test_sde_gan_pieces():
    torch.manual_seed(0)
    gan = SDEGAN(1, initial_noise_size=3, noise_size=2, hidden_size=8, width=16, depth=1, dt=0.1)
    ts = torch.linspace(0, 1, 6)
    fake = gan(ts, 16)
    assert fake.shape == (6, 16, 1)
    real = ornstein_uhlenbeck(16, ts, seed=0)
    gan.discriminator_loss(real, ts).backward()
    assert all(p.grad is not None for p in gan.discriminator.parameters())
    gan.generator_loss(ts, 16).backward()
    assert all(p.grad is not None for p in gan.generator.parameters())
    gan.discriminator.clip_weights()
    for m in gan.discriminator.modules():
        if isinstance(m, torch.nn.Linear):
            assert m.weight.abs().max() <= 1.0 / m.out_features + 1e-7
    d = CDEDiscriminator(1, hidden_size=4, width=8)
    y = torch.randn(6, 3, 1)
    assert d(y, ts).shape == (3,)


def test_cde_discriminator_is_the_heun_solve_of_its_cde():
    # the discriminator solves dh = f dt + g dY through nde.solve on a linear interpolation of (t, y):
    # it equals Heun's method written out by hand on the knots, for equal and unequal spacings
    from nde.models.neural_sde import _with_time

    torch.manual_seed(0)
    d = CDEDiscriminator(2, hidden_size=5, width=8).double()

    def by_hand(ys, ts):
        x = torch.cat([ts.reshape(-1, 1, 1).expand(ys.shape[:-1] + (1,)), ys], -1)
        h = d.initial(x[0])

        def step(t, h, dt, dx):
            th = _with_time(t, h)
            g = d.g_net(th).reshape(h.shape[:-1] + (5, 3))
            return d.f_net(th) * dt + (g @ dx.unsqueeze(-1)).squeeze(-1)

        for i in range(len(ts) - 1):
            dt, dx = ts[i + 1] - ts[i], x[i + 1] - x[i]
            k0 = step(ts[i], h, dt, dx)
            h = h + 0.5 * (k0 + step(ts[i + 1], h + k0, dt, dx))
        return d.readout(h).squeeze(-1)

    ys = torch.randn(11, 6, 2, dtype=torch.float64)
    for ts in (torch.linspace(0, 1, 11, dtype=torch.float64),
               torch.tensor([0.0, 0.05, 0.1, 0.3, 0.31, 0.5, 0.62, 0.7, 0.8, 0.95, 1.0], dtype=torch.float64)):
        torch.testing.assert_close(d(ys, ts), by_hand(ys, ts), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="observations"):
        d(ys, torch.linspace(0, 1, 5))


def _train_gan(iters, batch, hidden=16, width=32):
    """Adadelta on both players, weight clipping, stochastic weight average of the generator over the
    second half; returns the averaged generator's mean marginal W1, that of the noiseless generator
    following the data's mean path, and the generated/real standard deviation at the last time."""
    torch.manual_seed(0)
    ts = torch.linspace(0, 1, 11)
    data = ornstein_uhlenbeck(1024, ts, seed=1)
    gan = SDEGAN(1, initial_noise_size=4, noise_size=2, hidden_size=hidden, width=width, depth=1, dt=0.1)
    og = torch.optim.Adadelta(gan.generator.parameters(), lr=1.0)
    od = torch.optim.Adadelta(gan.discriminator.parameters(), lr=1.0)
    averaged = torch.optim.swa_utils.AveragedModel(gan.generator)
    for it in range(iters):
        real = data[:, torch.randint(0, 1024, (batch,))]
        loss = gan.discriminator(gan.generator(ts, batch), ts).mean() - gan.discriminator(real, ts).mean()
        og.zero_grad()
        od.zero_grad()
        loss.backward()
        for p in gan.generator.parameters():
            p.grad.neg_()
        og.step()
        od.step()
        gan.discriminator.clip_weights()
        if it >= iters // 2:
            averaged.update_parameters(gan.generator)
    with torch.no_grad():
        fake = averaged.module(ts, 1024)
    mean_path = data.mean(1, keepdim=True).expand_as(data)
    dist = sum(_w1(fake[i], data[i]) for i in range(len(ts))) / len(ts)
    baseline = sum(_w1(mean_path[i], data[i]) for i in range(len(ts))) / len(ts)
    return dist, baseline, (fake[-1].std() / data[-1].std()).item()


def test_sde_gan_beats_the_mean_path_baseline():
    # a noiseless generator following the mean path has W1 = 0.183 and no spread: the GAN must beat
    # both (measured: W1 0.125, spread ratio 0.86 after 150 steps)
    dist, baseline, spread = _train_gan(150, 64)
    print(f"SDE-GAN (150 steps): W1 {dist:.3f}, mean-path baseline {baseline:.3f}, spread ratio {spread:.2f}")
    assert dist < 0.8 * baseline and 0.5 < spread < 1.5, (dist, baseline, spread)


@pytest.mark.slow
def test_sde_gan_learns_ou_marginals():
    # measured: W1 0.060 against the mean-path baseline's 0.183, spread ratio 1.06
    dist, baseline, spread = _train_gan(600, 128)
    print(f"SDE-GAN (600 steps): W1 {dist:.3f}, mean-path baseline {baseline:.3f}, spread ratio {spread:.2f}")
    assert dist < 0.5 * baseline and 0.7 < spread < 1.3, (dist, baseline, spread)
