"""The HALP pruner: schedule, knapsack steps on a synthetic latency table, errors, exact resume."""
from __future__ import annotations


import pytest
import torch

from experiments.data import TensorImageDataset
from experiments.engine import TrainConfig, Trainer
from halp.graph import ChannelGraph
from halp.latency.cost import CostModel
from halp.models import create_model
from halp.pruners import HalpConfig, HalpPruner, PruneConfig

from conftest import synthetic_table


def lin(spec, ci, co):
    return 0.01 * ci * co * spec.kernel[0] * spec.kernel[1] / 9 + 0.05


def setup(cfg: PruneConfig, seed: int = 0, method_cfg: HalpConfig | None = None):
    torch.manual_seed(seed)
    model = create_model("halp:resnet20", num_classes=10, in_chans=1, width=0.5)
    graph = ChannelGraph.build(model, (1, 12, 12))
    table = synthetic_table(graph, lin, step=4)
    cost = CostModel.create(graph, table, overhead="none")
    return graph, HalpPruner(graph, cost, cfg, method_cfg)


def inject(pruner: HalpPruner, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pruner.saliency.sums = {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in pruner.saliency.sums.items()}
    pruner.saliency.count = 1
    return {k: v.clone() for k, v in pruner.saliency.sums.items()}


def test_geometric_targets():
    _, p = setup(PruneConfig(target=0.4, steps=5, chunk=4))
    L0 = p.dense_ms
    for t in range(6):
        assert p.target_ms(t) == pytest.approx(L0 ** (1 - t / 5) * (0.4 * L0) ** (t / 5))
    assert p.target_ms(5) == pytest.approx(0.4 * L0)


@pytest.mark.parametrize("solver", ["exact", "greedy"])
def test_steps_meet_targets_and_keep_the_most_important(solver):
    graph, p = setup(PruneConfig(target=0.35, steps=4, chunk=4), method_cfg=HalpConfig(solver=solver))
    before = p.masks
    for t in range(1, 5):
        scores = inject(p, t)
        active = {k: v.clone() for k, v in p.masks.items()}
        entry = p.prune_step()
        assert entry.step == t
        # an intermediate step may wait (lookahead) rather than make the final budget unreachable
        waited = t < 4 and entry.removed == 0 and entry.predicted_ms > p.target_ms(t)
        assert entry.predicted_ms <= p.target_ms(t) + 1e-9 or waited
        assert entry.predicted_ms == pytest.approx(p.cost.total_ms(p.widths()))
        for g in p.groups:
            keep, was = p.masks[g.id], active[g.id]
            assert not bool((keep & ~was).any()), "a pruned channel came back"
            assert (g.width - int(keep.sum())) % 4 == 0, "width left the latency table's grid"
            kept, dropped = scores[g.id][keep], scores[g.id][was & ~keep]
            if len(kept) and len(dropped):
                assert float(kept.min()) >= float(dropped.max()), "kept set is not a prefix of the ranking"
    assert bool(p.masks["conv1"].all()), "the stem's group is not pruned by default"
    assert sum(p.widths().values()) < sum(before.widths().values())


def test_bad_targets_are_clear_errors():
    with pytest.raises(ValueError, match=r"target ratio must be in \(0, 1\]"):
        PruneConfig(target=1.5)
    with pytest.raises(ValueError, match="latency floor"):
        setup(PruneConfig(target=0.01, chunk=4))
    with pytest.raises(ValueError, match="chunk"):
        PruneConfig(chunk="big")


def test_state_dict_round_trip():
    _, p = setup(PruneConfig(target=0.5, steps=3, chunk=4))
    inject(p, 1)
    p.prune_step()
    inject(p, 2)
    state = p.state_dict()
    _, q = setup(PruneConfig(target=0.5, steps=3, chunk=4))
    q.load_state_dict(state)
    assert q.masks == p.masks and q.step == 1
    p.prune_step()
    q.prune_step()
    assert q.masks == p.masks
    _, other = setup(PruneConfig(target=0.6, steps=3, chunk=4))
    with pytest.raises(ValueError, match="other pruning settings"):
        other.load_state_dict(state)


def make_data(n: int, seed: int) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long() + 2 * (images[:, 0, 0, 0] > 127).long()
    return TensorImageDataset(images, labels, (0.5,), (0.29,), pad=2, seed=seed)


def run(tmp_path, kill_after: int | None):
    cfg = PruneConfig(target=0.4, interval=3, steps=5, chunk=4)
    graph, pruner = setup(cfg)
    train = make_data(96, 1)
    val = make_data(32, 2)
    tcfg = TrainConfig(epochs=3, lr=0.05, batch_size=16, threads=1, seed=3)  # 18 iterations: 5 steps at 3, 6, .., 15

    def maybe_kill(entry):
        if kill_after is not None and entry.step == kill_after:
            raise KeyboardInterrupt  # the job is killed right after a pruning step (checkpoint is saved after)
    trainer = Trainer(graph.model, train, val, tcfg, pruner=pruner, checkpoint=tmp_path / "ck.pt",
                      progress=False, on_prune=maybe_kill)
    trainer.try_resume()
    trainer.fit()
    return pruner, graph.model


def test_killed_mid_pruning_resumes_to_identical_masks(tmp_path):
    ref, ref_model = run(tmp_path / "a", None)
    assert ref.step == 5 and sum(ref.widths().values()) < sum(g.width for g in ref.graph.groups.values())
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", kill_after=2)
    assert (tmp_path / "b" / "ck.pt").exists()
    # the checkpoint holds the state after step 1 (the kill came before step 2's save)
    resumed, model = run(tmp_path / "b", None)
    assert resumed.masks == ref.masks
    assert [e.widths for e in resumed.log] == [e.widths for e in ref.log]
    for (k, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)


def test_a_due_step_waits_for_finite_gradients_and_the_schedule_moves_with_it():
    """fp16 on CUDA: the trainer skips saliency on iterations whose gradients overflowed. A step
    due with nothing accumulated waits for the next finite iteration (it used to raise), and the
    later steps keep their spacing, so none is lost, even past the schedule's nominal end."""
    _, p = setup(PruneConfig(target=0.5, steps=3, chunk=4, start=0, interval=2))
    g = torch.Generator().manual_seed(0)

    def finite_iteration():  # what after_backward adds on an iteration with finite gradients
        for v in p.saliency.sums.values():
            v += torch.rand(v.shape, generator=g, dtype=torch.float64)
        p.saliency.count += 1

    overflow = {0, 1, 2, 4, 5}
    for it in range(12):
        if it not in overflow and p.active:
            finite_iteration()
        p.after_step()
    # due at 1 -> nothing yet, waits: 2 overflows too, 3 is finite -> step 1 at 3 (delay 2);
    # next due at 5 -> 4 and 5 overflowed -> waits, 6 is finite -> step 2 at 6 (delay 3);
    # next due at 8 (past the nominal end, 6) -> step 3 at 8; then the pruner is done
    assert [e.iteration for e in p.log] == [3, 6, 8]
    assert p.delay == 3 and p.done
    assert p.predicted_ms() <= p.final_target_ms + 1e-9
    state = p.state_dict()
    _, q = setup(PruneConfig(target=0.5, steps=3, chunk=4, start=0, interval=2))
    q.load_state_dict(state)
    assert q.delay == 3


def test_without_gradients_a_step_is_never_put_off():
    _, p = setup(PruneConfig(target=0.5, steps=2, chunk=4, start=0, interval=2),
                 method_cfg=HalpConfig(saliency="l1"))
    for _ in range(4):
        p.after_step()
    assert [e.iteration for e in p.log] == [1, 3] and p.delay == 0
