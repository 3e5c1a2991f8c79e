"""MAML/Meta-SGD checked against hand-derived values (as torchmeta does)."""
import numpy as np
import pytest
import torch

from dass_ray.core.meta import (MetaSGD, inner_update, kendall, load_predictor, make_model, save_predictor, spearman,
                             teacher_support)
from dass_ray.core.space import get_space
from dass_ray.core.predictor import Predictor, PredictorBatch, PredictorConfig, num_parameters


def test_inner_update_is_theta_minus_lr_grad_exactly():
    # loss = (w*x - t)^2, dL/dw = 2x(wx - t)
    w = torch.tensor(1.5, requires_grad=True)
    x, t, lr = 2.0, 1.0, torch.tensor(0.1)
    loss = (w * x - t) ** 2
    new = inner_update(loss, {"w": w}, {"w": lr})
    grad = 2 * x * (1.5 * x - t)  # = 8.0
    assert torch.equal(new["w"].detach(), torch.tensor(1.5) - lr * torch.tensor(grad))
    assert float(new["w"]) == pytest.approx(0.7)


def _meta_grads(first_order: bool):
    w = torch.tensor(1.5, requires_grad=True)
    a = torch.tensor(0.1, requires_grad=True)
    xs, ts = 2.0, 1.0  # support
    xq, tq = 1.0, 0.0  # query
    new = inner_update((w * xs - ts) ** 2, {"w": w}, {"w": a}, first_order=first_order)
    q = (new["w"] * xq - tq) ** 2
    gw, ga = torch.autograd.grad(q, [w, a])
    return float(gw), float(ga)


def test_second_order_meta_gradient_matches_hand_derivation():
    # w' = w - a*2xs(w xs - ts) = 1.5 - 0.1*8 = 0.7 ; dLq/dw' = 2 xq (w' xq - tq) = 1.4
    # dw'/dw = 1 - a*2xs^2 = 1 - 0.8 = 0.2 ; dw'/da = -8
    gw, ga = _meta_grads(first_order=False)
    assert gw == pytest.approx(1.4 * 0.2)
    assert ga == pytest.approx(1.4 * -8.0)


def test_first_order_drops_second_order_term_but_step_size_learns():
    gw, ga = _meta_grads(first_order=True)
    assert gw == pytest.approx(1.4)  # dw'/dw taken as 1
    assert ga == pytest.approx(1.4 * -8.0)  # step sizes still get gradients


def _batch(n, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PredictorBatch(
        student_maps=torch.randn(n, cfg.feature_channels, 4, 4, generator=g),
        teacher_map=torch.randn(1, cfg.feature_channels, 4, 4, generator=g),
        arch=torch.randn(n, cfg.encoding_size, generator=g),
        target=torch.rand(n, generator=g),
    )


TINY = PredictorConfig(feature_channels=16, encoding_size=10, enc_channels=(8, 8), hidden=8, arch_hidden=8)


def _tiny_task(n=6, inner_lr=0.005):
    """A tiny MetaSGD (seeded), a query batch of `n` students and its teacher's support at accuracy 0.9."""
    torch.manual_seed(0)
    m = MetaSGD(Predictor(TINY), inner_lr=inner_lr)
    q = _batch(n, TINY)
    return m, q, teacher_support(q.teacher_map, q.arch[0], 0.9)


def test_predictor_shapes_and_size():
    paper = PredictorConfig(feature_channels=256, encoding_size=200)
    n_paper = num_parameters(Predictor(paper))
    assert 1.0e6 < n_paper < 1.4e6  # "about 1.2M parameters at the authors' scale"
    cfg = PredictorConfig(feature_channels=128, encoding_size=200)
    p = Predictor(cfg)
    out = p(_batch(7, cfg))
    assert out.shape == (7,)
    base = Predictor(PredictorConfig(feature_channels=128, encoding_size=200, use_functional=False))
    assert base(_batch(3, cfg)).shape == (3,) and num_parameters(base) < 20_000


def test_functional_forward_equals_module_forward_and_does_not_mutate():
    cfg = PredictorConfig(feature_channels=16, encoding_size=10, enc_channels=(8, 8), hidden=8, arch_hidden=8)
    p = Predictor(cfg)
    b = _batch(5, cfg)
    params = p.named_params()
    torch.testing.assert_close(p(b, params), p(b))
    shifted = {k: v + 1.0 for k, v in params.items()}
    before = {k: v.clone() for k, v in params.items()}
    assert not torch.allclose(p(b, shifted), p(b))
    assert all(torch.equal(before[k], v) for k, v in p.named_params().items())


def test_meta_sgd_adapts_on_teacher_and_step_sizes_get_gradients():
    m, b, sup = _tiny_task()
    loss = m.task_loss(sup, b)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.step_sizes.values())
    assert any(float(p.grad.abs().sum()) > 0 for p in m.step_sizes.values())
    # one inner step moves the teacher's prediction toward its label
    before = float(m.predictor(sup))
    after = float(m.predictor(sup, m.adapt(sup)))
    assert abs(after - 0.9) < abs(before - 0.9)
    # predict() with and without adaptation differ and do not build graphs
    s1, s0 = m.predict(sup, b), m.predict(None, b)
    assert not s1.requires_grad and not torch.allclose(s1, s0)


def test_teacher_outside_the_meta_training_range_is_scored_without_the_step():
    torch.manual_seed(0)
    cfg = PredictorConfig(feature_channels=16, encoding_size=10, enc_channels=(8, 8), hidden=8, arch_hidden=8)
    m = MetaSGD(Predictor(cfg), inner_lr=0.05)
    b = _batch(6, cfg)
    m.teacher_acc_range = (0.5, 0.95)
    inside, outside = teacher_support(b.teacher_map, b.arch[0], 0.9), teacher_support(b.teacher_map, b.arch[0], 0.16)
    none = m.predict(None, b)
    assert not m.gated(inside) and m.gated(outside)
    gated = m.predict(outside, b)  # gated: the unadapted scores shifted by one constant (the same ranking) ...
    torch.testing.assert_close(gated - none, torch.full_like(none, float(gated[0] - none[0])))
    assert torch.equal(torch.argsort(gated), torch.argsort(none))
    # ... so that the teacher itself is predicted at its own accuracy
    assert float(m.predictor(outside, m.adapt(outside))) == pytest.approx(0.16, abs=1e-5)
    assert not torch.allclose(m.predict(outside, b, gate=False), none)  # the ablation still takes the step
    assert not torch.allclose(m.predict(inside, b), none)
    # a support of teacher + measured students (re-adaptation) is never gated
    two = PredictorBatch(b.student_maps[:2], b.teacher_map, b.arch[:2], torch.tensor([0.16, 0.1]))
    assert not m.gated(two) and not torch.allclose(m.predict(two, b), none)
    m.teacher_acc_range = None
    assert not m.gated(outside)


def test_rank_correlations():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert kendall(a, b) == pytest.approx(scipy_stats.kendalltau(a, b).statistic)


def test_weight_decay_shrinks_weights_and_never_the_step_sizes():
    from dass_ray.offline.metatrain import MetaTrainConfig, make_optimizer
    from dass_ray.core.meta import make_model
    from dass_ray.core.space import get_space

    space = get_space("cpu")
    model = make_model(space, inner_lr=0.005, seed=0)
    w0 = {n: p.detach().clone() for n, p in model.predictor.named_parameters()}
    s0 = {n: p.detach().clone() for n, p in model.step_sizes.named_parameters()}
    opt = make_optimizer(model, MetaTrainConfig(lr=0.01, weight_decay=0.5))
    loss = sum((p * 0).sum() for p in model.parameters())  # zero gradients: only the decay moves anything
    loss.backward()
    opt.step()
    for n, p in model.predictor.named_parameters():
        assert torch.allclose(p.detach(), w0[n] * (1 - 0.01 * 0.5)), n
    for n, p in model.step_sizes.named_parameters():
        assert torch.equal(p.detach(), s0[n]), n
    assert type(make_optimizer(model, MetaTrainConfig())) is torch.optim.Adam  # default: plain Adam, no decay


def test_pairwise_rank_loss_prefers_the_measured_order():
    from dass_ray.core.meta import pairwise_rank_loss

    y = torch.tensor([0.50, 0.60, 0.70, 0.80])
    right, wrong = pairwise_rank_loss(y * 2, y), pairwise_rank_loss(-y, y)
    assert 0 <= right < 0.002 < wrong  # ordered with margins far above T (0.02): near 0; inverted: large
    # ties carry no pair; all-equal targets give exactly 0 with a gradient graph
    p = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    zero = pairwise_rank_loss(p, torch.full((3,), 0.5))
    zero.backward()
    assert float(zero) == 0.0 and torch.equal(p.grad, torch.zeros(3))
    # its gradient moves a misordered pair toward the measured order
    p = torch.tensor([0.6, 0.5], requires_grad=True)
    pairwise_rank_loss(p, torch.tensor([0.4, 0.9])).backward()
    assert p.grad[0] > 0 > p.grad[1]  # descent lowers the worse student's score and raises the better one's


def test_rank_term_joins_the_query_loss_only_when_weighted():
    m, q, sup = _tiny_task()
    plain, ranked = m.task_loss(sup, q), m.task_loss(sup, q, rank_weight=1.0)
    from dass_ray.core.meta import pairwise_rank_loss

    params = m.adapt(sup)
    extra = pairwise_rank_loss(m.predictor(q, params), q.target)
    torch.testing.assert_close(ranked, plain + extra)
    ranked.backward()
    assert all(p.grad is not None for p in m.predictor.parameters())


def test_clipped_step_is_the_step_toward_a_target_at_most_clip_away():
    torch.manual_seed(0)
    cfg = PredictorConfig(feature_channels=16, encoding_size=10, enc_channels=(8, 8), hidden=8, arch_hidden=8)
    m = MetaSGD(Predictor(cfg), inner_lr=0.005)
    b = _batch(1, cfg)
    pred = float(m.predictor(teacher_support(b.teacher_map, b.arch[0], 0.0)))
    far = teacher_support(b.teacher_map, b.arch[0], pred + 5.0)  # a teacher far from anything seen
    near = teacher_support(b.teacher_map, b.arch[0], pred + 0.1)  # the same teacher at the clip distance
    m.adaptation, m.inner_clip = "clip", 0.1
    clipped = m.adapt(far)
    assert not m.gated(far)
    m.adaptation = "step"
    plain_near, plain_far = m.adapt(near), m.adapt(far)
    for k in clipped:
        torch.testing.assert_close(clipped[k], plain_near[k])
    assert any(not torch.allclose(clipped[k], plain_far[k]) for k in clipped)
    m.adaptation = "clip"  # within the clip the step is the plain one; gate=False is the plain step always
    inside = teacher_support(b.teacher_map, b.arch[0], pred + 0.05)
    a = m.adapt(inside)
    for k, v in m.adapt(far, gate=False).items():
        torch.testing.assert_close(plain_far[k], v)
    m.adaptation = "step"
    for k, v in m.adapt(inside).items():
        torch.testing.assert_close(a[k], v)


def test_adaptation_none_moves_only_the_output_bias_and_is_read_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    space = get_space("cpu")
    m = make_model(space, use_functional=True, inner_lr=0.05, seed=0)
    cfg = m.predictor.cfg
    b = _batch(6, cfg)
    t = teacher_support(b.teacher_map, b.arch[0], 0.9)
    none = m.predict(None, b)
    m.adaptation = "none"
    assert m.gated(t)
    shifted = m.predict(t, b)
    assert torch.equal(torch.argsort(shifted), torch.argsort(none))
    assert float(m.predictor(t, m.adapt(t))) == pytest.approx(0.9, abs=1e-5)
    for mode, clip in (("none", None), ("clip", 0.05), ("step", None)):
        path = tmp_path / f"{mode}.pt"
        save_predictor(path, m, space, {"adaptation": mode, **({"inner_clip": clip} if clip else {})})
        loaded, _ = load_predictor(path, space)
        assert loaded.adaptation == mode and (clip is None or loaded.inner_clip == clip)
    save_predictor(tmp_path / "old.pt", m, space, {})  # checkpoints from before the option: the gate
    assert load_predictor(tmp_path / "old.pt", space)[0].adaptation == "gate"
    save_predictor(tmp_path / "bad.pt", m, space, {"adaptation": "sometimes"})
    with pytest.raises(ValueError, match="meta.adaptation 'sometimes'"):
        load_predictor(tmp_path / "bad.pt", space)


def test_a_task_without_a_ranking_is_left_out_of_the_validation_mean():
    from dass_ray.offline.metadataset import MetaTask
    from dass_ray.offline.metatrain import evaluate, predict_task

    space = get_space("cpu")
    m = make_model(space, use_functional=True, seed=0)
    g = torch.Generator().manual_seed(0)

    def task(tid, acc):
        n = len(acc)
        return MetaTask(tid, "val", "src", 0.5, torch.randn(1, space.feature_channels, 4, 4, generator=g),
                        torch.randn(space.encoding_size, generator=g),
                        torch.randn(n, space.feature_channels, 4, 4, generator=g),
                        torch.randn(n, space.encoding_size, generator=g), torch.tensor(acc), np.zeros(n),
                        np.zeros(n), [])

    ranked = task("ranked", [0.1, 0.4, 0.2, 0.3, 0.5])
    flat = task("flat", [0.25] * 5)  # e.g. a teacher at chance: every student at chance too
    ev = evaluate(m, [ranked, flat])
    assert np.isnan(ev["tasks"]["flat"]["spearman"]) and ev["tasks_judged"] == 1
    assert ev["mean_spearman"] == pytest.approx(spearman(predict_task(m, ranked), ranked.acc.numpy()))
    assert np.isnan(evaluate(m, [flat])["mean_spearman"])


def test_shift_objective_learns_accuracy_relative_to_the_teacher():
    m, q, sup = _tiny_task()
    loss = m.task_loss(sup, q, shift=True)
    rel_pred = m.predictor(q) - m.predictor(sup)[0]
    torch.testing.assert_close(loss, ((rel_pred - (q.target - 0.9)) ** 2).mean())
    loss.backward()
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert all(p.grad is None for p in m.step_sizes.parameters())  # no step is taken, so none is learned
    # the trained model used as adaptation "none" scores exactly what the shift objective trained
    m.adaptation = "none"
    torch.testing.assert_close(m.predict(sup, q), (rel_pred + 0.9).detach())
    # `scale` divides the task's MSE (the "spread" task weighting)
    torch.testing.assert_close(m.task_loss(sup, q, shift=True, scale=0.5), 2 * loss.detach())


def test_spread_weighting_divides_each_task_by_the_variance_of_its_accuracies():
    from dass_ray.offline.metadataset import MetaTask
    from dass_ray.offline.metatrain import episode_loss_sum, task_scale

    space = get_space("cpu")
    m = make_model(space, use_functional=True, seed=0)
    g = torch.Generator().manual_seed(0)
    n = 5
    acc = torch.tensor([0.2, 0.22, 0.21, 0.25, 0.24])
    t = MetaTask("t", "train", "src", 0.23, torch.randn(1, space.feature_channels, 4, 4, generator=g),
                 torch.randn(space.encoding_size, generator=g), torch.randn(n, space.feature_channels, 4, 4,
                                                                           generator=g),
                 torch.randn(n, space.encoding_size, generator=g), acc, np.zeros(n), np.zeros(n), [])
    want = float(acc.var(unbiased=False)) + 0.01 ** 2
    assert task_scale(t, "spread") == pytest.approx(want) and task_scale(t, "equal") == 1.0
    flat = MetaTask(**{**t.__dict__, "acc": torch.full((n,), 0.25)})
    assert task_scale(flat, "spread") == pytest.approx(1e-4)  # all at chance: the floor, not a division by zero
    equal = episode_loss_sum(m, [t], [0], 0, 0, n)
    spread = episode_loss_sum(m, [t], [0], 0, 0, n, task_weight="spread")
    torch.testing.assert_close(spread, equal / want)
    with pytest.raises(ValueError, match="task_weight"):
        task_scale(t, "median")
    with pytest.raises(ValueError, match="train_adaptation"):
        episode_loss_sum(m, [t], [0], 0, 0, n, train_adaptation="gate")


def test_teacher_sets_split_the_tasks_at_the_search_s_weak_teacher_threshold():
    from types import SimpleNamespace

    from dass_ray.core.ranking import SIZE_BLEND_STRENGTH
    from dass_ray.offline.metatrain import by_teacher

    # 5 classes: chance 0.2; strength = (acc - 0.2) / 0.8, threshold 0.3 <=> accuracy 0.44
    edge = 0.2 + SIZE_BLEND_STRENGTH * 0.8
    tasks = [SimpleNamespace(task_id=n, teacher_acc=a, num_classes=5)
             for n, a in (("chance", 0.2), ("below", edge - 0.01), ("edge", edge + 1e-9), ("strong", 0.95))]
    ids = lambda ts: [t.task_id for t in ts]  # noqa: E731
    assert ids(by_teacher(tasks, "weak")) == ["chance", "below"]
    assert ids(by_teacher(tasks, "strong")) == ["edge", "strong"]
    assert ids(by_teacher(tasks)) == ids(tasks)
    with pytest.raises(ValueError, match="teachers must be one of"):
        by_teacher(tasks, "medium")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on a GPU machine)")
def test_shipped_predictor_scores_and_adapts_the_same_on_gpu():
    from pathlib import Path

    import dass_ray

    space = get_space("cpu")
    path = Path(dass_ray.__file__).parent / "assets" / "predictor" / "cpu.pt"
    cpu, _ = load_predictor(path, space)
    gpu, _ = load_predictor(path, space)
    gpu = gpu.to("cuda")
    cfg = cpu.predictor.cfg
    g = torch.Generator().manual_seed(3)
    q = PredictorBatch(torch.randn(300, cfg.feature_channels, space.feature_size, space.feature_size, generator=g),
                       torch.randn(1, cfg.feature_channels, space.feature_size, space.feature_size, generator=g),
                       torch.from_numpy(np.stack([space.encode(space.sample(np.random.default_rng(i)))
                                                  for i in range(300)])).float())
    sup = teacher_support(q.teacher_map, torch.from_numpy(space.encode(space.teacher())).float(), 0.8)
    for support in (None, sup):
        a = cpu.predict(support, q)
        b = gpu.predict(None if support is None else support.to("cuda"), q.to("cuda")).cpu()
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)  # cuDNN may use TF32 for the encoder's convs
        assert spearman(a.numpy(), b.numpy()) > 0.99
