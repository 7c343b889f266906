"""Deterministic training, exact resume, and checkpoints that diffusers loads."""

import torch
from diffusers import UNet2DModel

from dataward.config import TrainConfig
from dataward.data import load_source
from dataward.models.nets import build_unet
from dataward.diffusion.sampling import make_training_scheduler
from dataward.training.loop import PlainSteps, ShuffledBatches, TrainState, denoiser_loss, run_steps, train_batches

DATA = load_source("digits:subset=40")
SCHED = make_training_scheduler()
CFG = TrainConfig(steps=6, batch_size=16)


def train(seed: int, steps: int = 6, state: TrainState | None = None, generator_seed: int = 0) -> TrainState:
    state = state or TrainState.fresh(build_unet("tiny", 8, 1, 10, seed), CFG)
    run_steps(state, DATA, denoiser_loss(SCHED), steps, CFG, torch.Generator().manual_seed(generator_seed + seed))
    return state


def flat(state: TrainState) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in state.model.parameters()])


def test_same_seed_same_bits_different_seed_different():
    a, b, c = train(0), train(0), train(1)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


def test_resume_at_a_stage_boundary_is_bitwise_exact(tmp_path):
    """Stages resume from a saved state (weights, EMA, Adam, step); each stage has its own generator, as in the ward."""
    stage_gens = lambda: (torch.Generator().manual_seed(10), torch.Generator().manual_seed(11))
    g1, g2 = stage_gens()
    full = TrainState.fresh(build_unet("tiny", 8, 1, 10, 0), CFG)
    run_steps(full, DATA, denoiser_loss(SCHED), 3, CFG, g1)
    run_steps(full, DATA, denoiser_loss(SCHED), 3, CFG, g2)
    g1, g2 = stage_gens()
    first = TrainState.fresh(build_unet("tiny", 8, 1, 10, 0), CFG)
    run_steps(first, DATA, denoiser_loss(SCHED), 3, CFG, g1)
    first.save(tmp_path / "state.safetensors")
    resumed = TrainState.fresh(build_unet("tiny", 8, 1, 10, 123), CFG)  # different init, overwritten by load
    resumed.load(tmp_path / "state.safetensors")
    run_steps(resumed, DATA, denoiser_loss(SCHED), 3, CFG, g2)
    assert resumed.step == full.step == 6
    assert torch.equal(flat(resumed), flat(full))
    for x, y in zip(resumed.ema.shadow_params, full.ema.shadow_params):
        assert torch.equal(x, y)


def test_the_loop_counts_only_the_steps_its_stepper_takes():
    """A stepper may take no step for a batch (DP-SGD: a physical batch inside a logical one): the one loop then leaves
    the EMA, the step counter and ``on_step`` alone, and the next batch starts from cleared gradients."""

    class EveryOther(PlainSteps):
        calls = 0

        def step(self) -> bool:
            self.calls += 1
            return super().step() if self.calls % 2 == 0 else False

    state = TrainState.fresh(build_unet("tiny", 8, 1, 10, 0), CFG)
    generator, losses = torch.Generator().manual_seed(0), []
    train_batches(state, ShuffledBatches(DATA, 16, 6, generator), denoiser_loss(SCHED), generator, stepper=EveryOther(state), on_step=losses.append)
    assert state.step == state.ema.optimization_step == len(losses) == 3
    plain = TrainState.fresh(build_unet("tiny", 8, 1, 10, 0), CFG)
    generator = torch.Generator().manual_seed(0)
    train_batches(plain, ShuffledBatches(DATA, 16, 6, generator), denoiser_loss(SCHED), generator)
    assert plain.step == 6 and not torch.equal(flat(plain), flat(state))


def test_checkpoint_loads_with_from_pretrained(tmp_path):
    state = train(0, steps=2)
    model = build_unet("tiny", 8, 1, 10, 0)
    model.load_state_dict(state.ema_state_dict())
    model.save_pretrained(str(tmp_path / "m"), safe_serialization=True)
    loaded = UNet2DModel.from_pretrained(str(tmp_path / "m"), use_safetensors=True, low_cpu_mem_usage=False).eval()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor(10), torch.tensor([1, 2, 3])
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, class_labels=y).sample, loaded(x, t, class_labels=y).sample)


def test_loss_decreases_on_real_data():
    state = TrainState.fresh(build_unet("tiny", 8, 1, 10, 0), TrainConfig(batch_size=40, lr=2e-3))
    losses = []
    run_steps(state, DATA, denoiser_loss(SCHED), 25, TrainConfig(batch_size=40), torch.Generator().manual_seed(0), on_step=losses.append)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_epoch_budget_counts_passes_at_the_batch_actually_drawn():
    config = TrainConfig(epochs=10, batch_size=128)
    assert config.total_steps(1280) == 100
    assert config.total_steps(40) == 10  # a compartment smaller than a batch still gets its 10 passes
    assert TrainConfig(steps=7).total_steps(40) == 7


def test_sisa_stages_add_up_to_the_epoch_budget():
    from dataward.ward import Lineage

    ids = [f"digits:{i:04d}" for i in range(1200)]
    stages = tuple(tuple(ids[: 300 * (r + 1)]) for r in range(4))
    lineage = Lineage("denoiser", 0, stages, TrainConfig(epochs=8, batch_size=100))
    steps = [lineage.stage_steps(r) for r in range(4)]
    assert steps == sorted(steps) and abs(sum(steps) - 8 * 1200 / 100) <= 4  # ceil per stage
    small = Lineage("denoiser", 0, (tuple(ids[:20]), tuple(ids[:40])), TrainConfig(epochs=9, batch_size=128))
    # each stage makes 2/3 of 9 = 6 passes over its data at batch = its size
    assert [small.stage_steps(r) for r in range(2)] == [6, 6]
