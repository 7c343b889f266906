"""The one sampling loop and composition, with closed-form stand-in denoisers."""

import pytest
import torch

from dataward.diffusion.compose import ComposedDenoiser
from dataward.diffusion.sampling import make_sampler, make_training_scheduler, sample_loop

SCHEDULER = make_training_scheduler()
ALPHA_BAR = SCHEDULER.alphas_cumprod


def point_mass_eps(m):
    """The exact ε for data that is a single point m: ε = (x_t − sqrt(ᾱ) m) / sqrt(1 − ᾱ)."""

    def eps(x_t, t, y):
        a = ALPHA_BAR[int(t)]
        return (x_t - a.sqrt() * m) / (1 - a).sqrt()

    return eps


def gaussian_eps(m, v):
    """The exact ε for data N(m, v I)."""

    def eps(x_t, t, y):
        a = ALPHA_BAR[int(t)]
        return (1 - a).sqrt() * (x_t - a.sqrt() * m) / (a * v + 1 - a)

    return eps


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_full_loop_reaches_the_point_mass(sampler):
    m = torch.tensor([0.5, -0.25, 0.0, 0.75]).reshape(1, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    x = sample_loop(point_mass_eps(m), torch.randn(8, 1, 2, 2, generator=g), make_sampler(SCHEDULER, sampler), steps=25, generator=g)
    assert torch.allclose(x, m.expand_as(x), atol=1e-4)


def test_loop_is_seeded():
    eps = gaussian_eps(torch.zeros(1, 1, 2, 2), 0.1)
    runs = []
    for _ in range(2):
        g = torch.Generator().manual_seed(3)
        runs.append(sample_loop(eps, torch.randn(4, 1, 2, 2, generator=g), make_sampler(SCHEDULER, "ddpm"), steps=10, generator=g))
    assert torch.equal(runs[0], runs[1])


def test_guidance_is_applied_in_eps_space():
    """A constant guidance gradient g shifts ε by −sqrt(1−ᾱ_t) g; DDIM on a point mass m then ends at m + (1 − ᾱ)/sqrt(ᾱ) g
    (the last step returns the predicted x_0 at the last timestep)."""
    m = torch.zeros(1, 1, 2, 2)
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(16, 1, 2, 2, generator=g)
    plain = sample_loop(point_mass_eps(m), x_T, make_sampler(SCHEDULER, "ddim"), steps=20)
    pushed = sample_loop(point_mass_eps(m), x_T, make_sampler(SCHEDULER, "ddim"), steps=20, guidance=lambda x, t: torch.ones_like(x))
    sampler = make_sampler(SCHEDULER, "ddim")
    sampler.set_timesteps(20)
    a = ALPHA_BAR[int(sampler.timesteps[-1])]
    assert torch.allclose(plain, m.expand_as(plain), atol=1e-5)
    assert torch.allclose(pushed - plain, ((1 - a) / a.sqrt()).expand_as(plain), rtol=1e-3, atol=1e-7)


MEANS = [torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), -1.0), torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]])]
LAMBDA = torch.tensor([0.5, 0.3, 0.2])


def test_density_weights_recover_the_mixture():
    """Itô density weights over three Gaussian 'compartments' sample the λ-mixture and attribute samples correctly."""
    n = 600
    g = torch.Generator().manual_seed(0)
    composed = ComposedDenoiser([gaussian_eps(m, 0.05) for m in MEANS], LAMBDA.log().expand(n, 3).clone(), ALPHA_BAR, "density")
    x = sample_loop(composed, torch.randn(n, 1, 2, 2, generator=g), make_sampler(SCHEDULER, "ddpm"), steps=50, generator=g)
    nearest = torch.stack([(x - m).flatten(1).pow(2).sum(1) for m in MEANS], 1).argmin(1)
    share = torch.bincount(nearest, minlength=3) / n
    assert torch.allclose(share, LAMBDA, atol=0.06), share
    assert (composed.final_weights.argmax(1) == nearest).float().mean() > 0.97
    assert torch.allclose(composed.attribution().sum(1), torch.ones(n), atol=1e-5)


def test_density_weights_track_the_true_posterior_mid_trajectory():
    """At an intermediate step the estimated w equals p(i | x_t) computed in closed form, within tolerance."""
    n, v = 400, 0.05
    g = torch.Generator().manual_seed(1)
    composed = ComposedDenoiser([gaussian_eps(m, v) for m in MEANS], LAMBDA.log().expand(n, 3).clone(), ALPHA_BAR, "density")
    sampler = make_sampler(SCHEDULER, "ddpm")
    sampler.set_timesteps(100)
    x = torch.randn(n, 1, 2, 2, generator=g)
    for i, t in enumerate(sampler.timesteps):
        e = composed(x, t, None)
        if i == 70:
            a = ALPHA_BAR[int(t)]
            var = a * v + 1 - a
            log_post = torch.stack([-(x - a.sqrt() * m).flatten(1).pow(2).sum(1) / (2 * var) for m in MEANS], 1) + LAMBDA.log()
            true_w = torch.softmax(log_post, 1)
            assert (composed.current_weights(x, t) - true_w).abs().mean() < 0.08
        x = sampler.step(e, t, x, generator=g).prev_sample


def _counting(eps, i, calls):
    def inner(x, t, y):
        calls.append((int(t), i, len(x)))
        return eps(x, t, y)

    return inner


def test_top_k_renormalizes_over_the_k_heaviest_and_evaluates_only_them():
    """One composed step with k = 2 of K = 3, against the formula written out: w restricted to each sample's two heaviest
    compartments and renormalized, each compartment evaluated once, on exactly the samples that chose it."""
    n = 32
    g = torch.Generator().manual_seed(2)
    x, logits = torch.randn(n, 1, 2, 2, generator=g), 2 * torch.randn(n, 3, generator=g)
    t = torch.tensor(600)
    calls = []
    eps = [gaussian_eps(m, 0.05) for m in MEANS]
    log_prior = LAMBDA.log().expand(n, 3).clone()
    c = ComposedDenoiser([_counting(e, i, calls) for i, e in enumerate(eps)], log_prior, ALPHA_BAR, "router",
                         lambda x_t, t_: logits, [0, 1, 2], top_k=2)
    got = c(x, t, None)
    w = torch.softmax(logits + log_prior, dim=1)
    keep = torch.ones_like(w, dtype=torch.bool).scatter_(1, w.argmin(dim=1, keepdim=True), False)  # K = 3: drop the lightest
    w2 = torch.where(keep, w, 0.0)
    w2 = w2 / w2.sum(dim=1, keepdim=True)
    want = sum(w2[:, i, None, None, None] * eps[i](x, t, None) for i in range(3))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(c.final_weights > 0, keep)
    assert sorted((i, rows) for _, i, rows in calls) == [(i, int(keep[:, i].sum())) for i in range(3) if keep[:, i].any()]
    full = ComposedDenoiser(eps, log_prior, ALPHA_BAR, "router", lambda x_t, t_: logits, [0, 1, 2])(x, t, None)
    assert (got - full).abs().max() > 1e-3  # the restriction is not a no-op on these weights


def test_top_1_density_evaluates_one_compartment_per_sample_and_step_and_advances_only_it():
    n, steps = 32, 20
    calls = []
    x_T = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    c = ComposedDenoiser([_counting(gaussian_eps(m, 0.05), i, calls) for i, m in enumerate(MEANS)], LAMBDA.log().expand(n, 3).clone(),
                         ALPHA_BAR, "density", top_k=1)
    sample_loop(c, x_T, make_sampler(SCHEDULER, "ddpm"), steps=steps, generator=torch.Generator().manual_seed(5))
    per_step: dict[int, list[int]] = {}
    for t, i, rows in calls:
        per_step.setdefault(t, []).append(i)
        assert rows < n or len(per_step[t]) == 1  # a compartment holding every sample is the only one called that step
    assert len(per_step) == steps
    assert all(len(called) == len(set(called)) for called in per_step.values())  # each compartment at most once per step
    assert sum(rows for _, _, rows in calls) == steps * n  # each sample evaluated by exactly one compartment per step
    # the Itô update advances only the compartment each sample evaluated: feed one x sequence to top-1 and to the full mixture
    x0, x1 = torch.randn(2, n, 1, 2, 2, generator=torch.Generator().manual_seed(9))
    t0, t1 = torch.tensor(700), torch.tensor(650)
    eps = [gaussian_eps(m, 0.05) for m in MEANS]
    top1 = ComposedDenoiser(eps, LAMBDA.log().expand(n, 3).clone(), ALPHA_BAR, "density", top_k=1)
    full = ComposedDenoiser(eps, LAMBDA.log().expand(n, 3).clone(), ALPHA_BAR, "density")
    top1(x0, t0, None), full(x0, t0, None)
    chosen = top1.final_weights > 0  # (N, K): the compartment each sample evaluated at t0
    top1(x1, t1, None), full(x1, t1, None)
    torch.testing.assert_close(top1.log_q[chosen], full.log_q[chosen], rtol=1e-5, atol=1e-5)
    assert torch.all(top1.log_q[~chosen] == 0) and torch.all(full.log_q[~chosen] != 0)


def test_router_weights_use_only_allowed_columns():
    n = 8
    router = lambda x, t: torch.tensor([[0.0, 50.0, 0.0, 1.0]]).expand(len(x), -1)  # column 1 (excluded) dominates
    c = ComposedDenoiser([gaussian_eps(MEANS[0], 0.05), gaussian_eps(MEANS[1], 0.05)], torch.zeros(n, 2), ALPHA_BAR, "router", router, [0, 3])
    w = c.current_weights(torch.zeros(n, 1, 2, 2), torch.tensor(500))
    assert torch.allclose(w, torch.softmax(torch.tensor([0.0, 1.0]), 0).expand(n, -1))


def _unets(k: int, num_classes: int | None = 10):
    from dataward.models.nets import build_unet

    return [build_unet("tiny", 8, 1, num_classes, seed=s).eval() for s in range(k)]


@pytest.mark.parametrize("num_classes", [10, None])
def test_stacked_evaluation_equals_the_per_model_loop_for_all_rows_and_for_top_k_rows(num_classes):
    """Issue 16: the batched path (one vmap call) gives each compartment's ε within float tolerance of calling it alone,
    for every row and for top-k row subsets (k < K), zeros where a compartment is not evaluated."""
    from dataward.diffusion.batched import StackedDenoisers

    models = _unets(4, num_classes)
    stacked = StackedDenoisers(models)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 1, 8, 8, generator=g)
    y = None if num_classes is None else torch.randint(0, 10, (9,), generator=g)
    t = torch.tensor(400)
    with torch.no_grad():
        loop = torch.stack([m(x, t, class_labels=y).sample for m in models])
    everything = stacked(x, t, y, torch.ones(9, 4))
    assert torch.allclose(everything, loop, atol=1e-5), (everything - loop).abs().max()
    mask = torch.zeros(9, 4)
    top = torch.randint(0, 4, (9, 2), generator=g)  # top-2 (sometimes the same compartment twice: one row)
    mask.scatter_(1, top, 1.0)
    mask[:, 3] = 0  # one compartment evaluated by no row at all
    some = stacked(x, t, y, mask)
    expected = loop * mask.T.reshape(4, 9, 1, 1, 1)
    assert torch.allclose(some, expected, atol=1e-5) and bool((some[3] == 0).all())


def test_batched_sampling_matches_the_loop(ward_copy):
    for weights, sampler, top_k in (("density", "ddpm", None), ("density", "ddpm", 2), ("router", "ddim", 1)):
        a = ward_copy.sample(6, seed=1, steps=4, weights=weights, sampler=sampler, top_k=top_k, batched=True)
        b = ward_copy.sample(6, seed=1, steps=4, weights=weights, sampler=sampler, top_k=top_k, batched=False)
        assert torch.allclose(a.images, b.images, atol=1e-4) and torch.allclose(a.attribution, b.attribution, atol=1e-4)


def test_a_sample_result_says_what_its_picture_shows(ward_copy):
    result = ward_copy.sample(4, seed=3, steps=2, allowed=[0, 2])
    caption = result.caption(seed=3)
    assert caption.startswith("4 samples from compartments 0, 2 (") and "seed 3" in caption
    assert "one row per class asked for" in caption and "under each image, the share each compartment made of it" in caption
    assert result.weights in caption
