"AdaGlimpse: actions map to valid boxes inside the image, the crop equals an exact integer crop + interpolate, rewards telescope to s_T − s_0, the squashed-Gaussian log-density, SAC learns a toy control task, and the committed medium run's learned policy beats random glimpses."
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from effworkbench.core import ConfigError, load_table
from effworkbench.vision.adaglimpse import (POLICIES, SAC, Actor, GlimpseEnv, GlimpseViT, ReplayBuffer, SACConfig, action_to_box,
                                     bootstrap_diff, box_to_action, centre_zoom_policy, evaluate_policy, extract_glimpse,
                                     grid_policy, patch_boxes, pixels_seen, random_policy, take_glimpses)

torch.set_num_threads(1)


@pytest.mark.parametrize("hw", [(64, 64), (96, 80)])
def test_actions_map_into_scale_range_and_boxes_stay_inside(hw):
    H, W = hw
    g = torch.Generator().manual_seed(0)
    a = torch.rand(5000, 3, generator=g) * 1.4 - 0.2                     # some actions outside [0,1]³ too: clamped
    a[:8] = torch.tensor([[0, 0, 0], [1, 1, 1], [0, 1, 0], [1, 0, 1], [0.5, 0.5, 0], [0.5, 0.5, 1], [0, 0, 1], [1, 1, 0]]).float()
    x0, y0, d = action_to_box(a, hw).unbind(-1)
    s = min(H, W)
    assert d.min() >= s / 8 - 1e-5 and d.max() <= s / 2 + 1e-5
    assert torch.isclose(d[0], torch.tensor(s / 8)) and torch.isclose(d[1], torch.tensor(s / 2))
    assert (x0 >= 0).all() and (y0 >= 0).all() and (x0 + d <= W + 1e-4).all() and (y0 + d <= H + 1e-4).all()
    # the sampling grid of the crop stays within the image: normalised coordinates of every sample in [-1, 1]
    boxes = torch.stack([x0, y0, d], -1)[:500]
    img = torch.zeros(500, 1, H, W)
    theta = torch.zeros(500, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = d[:500] / W, (2 * x0[:500] + d[:500]) / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = d[:500] / H, (2 * y0[:500] + d[:500]) / H - 1
    grid = F.affine_grid(theta, (500, 1, 16, 16), align_corners=False)
    assert grid.abs().max() <= 1 + 1e-5
    # a glimpse of an all-ones image is all ones (nothing read from outside the image)
    assert torch.allclose(extract_glimpse(img + 1, boxes, 16), torch.ones(500, 1, 16, 16), atol=1e-6)


def test_glimpse_matches_integer_crop_then_interpolate():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 2, 64, 64, generator=g, dtype=torch.float64)
    for _ in range(40):
        P = int([8, 16][torch.randint(0, 2, (1,), generator=g)])
        d = P * int(torch.randint(1, 32 // P + 1, (1,), generator=g))    # side a multiple of P, ≤ 32: the crop is exact
        d = max(d, 8)
        x0, y0 = (int(v) for v in torch.randint(0, 64 - d + 1, (2,), generator=g))
        got = extract_glimpse(img, torch.tensor([[x0, y0, d]], dtype=torch.float64), P)
        ref = F.interpolate(img[:, :, y0:y0 + d, x0:x0 + d], size=(P, P), mode="bilinear", align_corners=False)
        assert torch.allclose(got, ref, atol=1e-10), (x0, y0, d, P)
    # the same through an action whose box is integer: x = x0/(W − d), z = (d − d_min)/(d_max − d_min)
    a = torch.tensor([[12 / (64 - 16), 40 / (64 - 16), (16 - 8) / 24]], dtype=torch.float64)
    got, boxes = take_glimpses(img, a[:, None], 16)
    assert torch.allclose(boxes[0, 0], torch.tensor([12., 40., 16.], dtype=torch.float64))
    assert torch.allclose(got[:, 0], img[:, :, 40:56, 12:28], atol=1e-10)


def test_rewards_sum_to_final_minus_initial_score():
    torch.manual_seed(0)
    model = GlimpseViT(16, 8, dim=16, depth=1, heads=2).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 1, 64, 64, generator=g), torch.randint(0, 10, (6,), generator=g)
    env = GlimpseEnv(model, budget=5)
    env.reset(x, y)
    rewards, actions = [], torch.rand(5, 6, 3, generator=g)
    for t in range(5):
        _, r, done = env.step(actions[t]); rewards.append(r)
        assert done == (t == 4)
    # s_t recomputed independently: the model on the first t glimpses, probability of the true class
    with torch.no_grad():
        gl, bx = take_glimpses(x, actions.transpose(0, 1), 16)
        s = torch.stack([model(gl[:, :t], bx[:, :t], (64, 64))[0].softmax(-1)[torch.arange(6), y] for t in range(6)])
    assert torch.allclose(torch.stack(rewards), s[1:] - s[:-1], atol=1e-6)
    assert torch.allclose(torch.stack(rewards).sum(0), s[-1] - s[0], atol=1e-6)
    assert torch.allclose(env.seen(), pixels_seen(bx, (64, 64)))
    with pytest.raises(ConfigError, match="budget"): env.step(actions[0])


def test_squashed_gaussian_log_density_matches_float64_reference():
    torch.manual_seed(0)
    actor = Actor(nn.Identity(), 5, 3, 16).double()
    s = torch.randn(200, 5, dtype=torch.float64)
    torch.manual_seed(1)
    a, logp = actor(s)
    mu, log_std = actor.body(s).chunk(2, -1)
    ref = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu, log_std.clamp(-5, 2).exp()),
        [torch.distributions.TanhTransform(), torch.distributions.AffineTransform(0.5, 0.5)])
    a_c = a.clamp(1e-6, 1 - 1e-6)
    keep = ((a > 1e-4) & (a < 1 - 1e-4)).all(-1)                      # away from the saturated ends
    assert keep.sum() > 100
    assert torch.allclose(logp[keep], ref.log_prob(a_c).sum(-1)[keep], atol=1e-4)
    assert ((a >= 0) & (a <= 1)).all()


def test_sac_learns_a_toy_reaching_task():
    "State = (target ∈ [0,1]³, step); reward −‖a − target‖²; 3 steps. Random: ≈ −1.5 per episode; optimum 0."
    g = torch.Generator().manual_seed(0)
    agent = SAC(lambda: (nn.Identity(), 4), 3, SACConfig(hidden=64, batch_size=128, lr=1e-3, alpha_lr=1e-3, gamma=0.9), seed=0)
    buf = ReplayBuffer(20000, (4,), 3)

    def episode_return(policy, n=256, learn=False):
        target, ret = torch.rand(n, 3, generator=g), torch.zeros(n)
        for t in range(3):
            s = torch.cat([target, torch.full((n, 1), t / 3)], 1)
            a = policy(s)
            r = -((a - target) ** 2).sum(-1)
            s2 = torch.cat([target, torch.full((n, 1), (t + 1) / 3)], 1)
            if learn:
                buf.add(s, a, r, s2, torch.full((n,), float(t == 2)))
                if buf.n >= 512:
                    for _ in range(2): agent.update(buf)
            ret += r
        return ret.mean().item()

    random_ret = episode_return(lambda s: torch.rand(len(s), 3, generator=g), n=4096)
    for _ in range(60): episode_return(lambda s: agent.act(s), n=32, learn=True)     # ≈ 350 SAC updates
    learned_ret = episode_return(lambda s: agent.act(s, deterministic=True), n=4096)
    assert -1.7 < random_ret < -1.3
    assert learned_ret > random_ret + 0.8, (random_ret, learned_ret)


def test_baseline_policies():
    torch.manual_seed(0)
    model = GlimpseViT(16, 8, dim=16, depth=1, heads=2).eval()
    x, y = torch.rand(7, 1, 64, 64), torch.randint(0, 10, (7,))
    ev = {p: evaluate_policy(GlimpseEnv(model, 4), x, y, f, batch_size=3)
          for p, f in [("grid", grid_policy), ("centre-zoom", centre_zoom_policy), ("random", random_policy(0))]}
    assert torch.allclose(ev["grid"]["seen"], torch.tensor([0.25, 0.5, 0.75, 1.0]).expand(7, 4))
    assert torch.allclose(ev["centre-zoom"]["boxes"][0, :, 2], torch.tensor([32., 16., 8., 8.]))
    assert all((e["seen"].diff(dim=1) >= 0).all() for e in ev.values())
    b = box_to_action(torch.tensor([5.]), torch.tensor([60.]), torch.tensor([16.]), (64, 64))    # clamped inside
    assert torch.allclose(action_to_box(b, (64, 64)), torch.tensor([[0., 48., 16.]]))
    pb = patch_boxes(torch.tensor([[16., 32., 32.]]), 2, (64, 64))
    assert torch.allclose(pb[0, 3], torch.tensor([40 / 64, 56 / 64, 16 / 64]))


def test_bootstrap_interval_covers_the_difference():
    rng = np.random.default_rng(0)
    a, b = (rng.random(2000) < 0.6).astype(float), (rng.random(2000) < 0.5).astype(float)
    r = bootstrap_diff(a, b, n_boot=3000)
    se = math.sqrt(0.6 * 0.4 / 2000 + 0.5 * 0.5 / 2000)
    assert abs((r["hi"] - r["lo"]) - 2 * 1.96 * se) < 0.25 * 2 * 1.96 * se
    assert r["lo"] < a.mean() - b.mean() < r["hi"]


def test_committed_medium_tables_are_self_consistent():
    "Per seed, the bootstrap table's mean differences are the curves' accuracy differences (the verdicts: tests/test_claims.py)."
    curves, boot = load_table("adaglimpse_curves_medium"), load_table("adaglimpse_bootstrap_medium")
    assert curves.attrs["env"]["preset"] == "medium"
    assert set(curves.policy) == set(POLICIES) and curves.seed.nunique() >= 3
    for seed, c in curves.groupby("seed"):
        acc = c.pivot(index="policy", columns="glimpses", values="accuracy")
        for baseline, d in boot[boot.seed == seed].groupby("baseline"):
            d = d.set_index("glimpses")
            assert len(d) == acc.shape[1] and np.allclose(d["diff"], acc.loc["sac"] - acc.loc[baseline], atol=1e-6), (seed, baseline)


def test_train_agent_stores_scaled_rewards():
    "The buffer holds reward_scale · r (every other test runs at the default 1): same episodes, 7× the stored rewards."
    from types import SimpleNamespace

    from effworkbench.vision.adaglimpse import train_agent
    torch.manual_seed(0)
    model = GlimpseViT(16, 8, dim=16, depth=1, heads=2).eval()
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 1, 64, 64, generator=g), torch.randint(0, 10, (8,), generator=g)

    class Recorder:                      # an agent that only records what the buffer holds
        cfg = SimpleNamespace(buffer=64, batch_size=1)
        def act(self, s): raise AssertionError("warm-up rounds act at random")
        def update(self, buf): self.r = buf.r[:buf.n].clone(); return {}

    got = {}
    for scale in (1.0, 7.0):
        agent = Recorder()
        train_agent(GlimpseEnv(model, budget=3), agent, x, y, rounds=1, n_envs=4, warmup=1, seed=0, reward_scale=scale)
        got[scale] = agent.r
    assert len(got[1.0]) == 12 and got[1.0].abs().sum() > 0
    assert torch.allclose(got[7.0], 7 * got[1.0], atol=1e-6)
