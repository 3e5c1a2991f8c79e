import numpy as np
import pytest
import torch

from dass_ray.core.embed import Embedder, embed_reference, noise_input
from dass_ray.core.nets import build
from dass_ray.core.space import ArchConfig, get_space

from conftest import randomize_bn


def test_noise_input_is_seeded(cpu_space):
    assert torch.equal(noise_input(cpu_space, 3), noise_input(cpu_space, 3))
    assert not torch.equal(noise_input(cpu_space, 3), noise_input(cpu_space, 4))
    assert noise_input(cpu_space).shape == (1, 3, 32, 32)


def test_batched_engine_equals_per_student_forward(cpu_space, cpu_teacher, rng):
    emb = Embedder(cpu_teacher.state_dict(), cpu_space, seed=0)
    archs = cpu_space.sample_many(rng, 60) + [cpu_space.teacher(), cpu_space.smallest()]
    fast = emb.embed(archs, batch_size=25)  # several batches, uneven last one
    ref = embed_reference(cpu_teacher.state_dict(), archs, cpu_space, emb.x)
    assert fast.shape == (62, 128, 4, 4)
    scale = ref.abs().max()
    assert scale > 1.0  # non-trivial maps
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(scale))
    # the teacher's own embedding is the teacher's stage-4 map
    torch.testing.assert_close(fast[-2:-1], emb.teacher_embedding(), rtol=1e-4, atol=1e-4 * float(scale))


def test_batched_engine_is_order_independent(cpu_space, cpu_teacher, rng):
    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    archs = cpu_space.sample_many(rng, 20)
    a = emb.embed(archs)
    b = emb.embed(archs[::-1])
    torch.testing.assert_close(a, b.flip(0), rtol=1e-5, atol=1e-5)
    assert emb.embed([]).shape == (0, 128, 4, 4)


def test_paper_preset_engine_matches_reference():
    space = get_space("paper")
    t = randomize_bn(build(space.teacher(), space, seed=1)).eval()
    emb = Embedder(t.state_dict(), space)
    archs = space.sample_many(np.random.default_rng(2), 4)
    ref = embed_reference(t.state_dict(), archs, space, emb.x)
    torch.testing.assert_close(emb.embed(archs), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_engine_rejects_non_members(cpu_space, cpu_teacher):
    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    with pytest.raises(ValueError, match="width 7"):
        emb.embed([ArchConfig(((16,), (7,), (64,), (128,)))])


def _reference_check(space, archs, teacher_arch=None, seed=3, **embed_kw):
    teacher_arch = teacher_arch or space.teacher()
    t = randomize_bn(build(teacher_arch, space, seed=seed), seed=seed).eval()
    emb = Embedder(t.state_dict(), space, teacher_arch=teacher_arch)
    fast = emb.embed(archs, **embed_kw)
    ref = embed_reference(t.state_dict(), archs, space, emb.x, teacher_arch=teacher_arch)
    assert fast.shape == ref.shape and fast.is_contiguous()
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    return emb, fast


def test_shared_prefixes_are_computed_once(cpu_space, cpu_teacher, rng):
    # duplicates and candidates sharing long prefixes: one row per distinct prefix, same maps as the reference
    base = cpu_space.sample_many(rng, 6)
    archs = base + base[:3] + [cpu_space.mutate(a, rng) for a in base]
    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    fast = emb.embed(archs, batch_size=7)
    ref = embed_reference(cpu_teacher.state_dict(), archs, cpu_space, emb.x)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    st = emb.stats
    assert st["candidates"] == len(archs)
    assert st["candidate_block_rows"] == sum(len(s) for a in archs for s in a.widths)
    assert 0 < st["rows"] < st["candidate_block_rows"] and st["conv_flops"] > 0
    one = emb.embed(archs[:1])
    assert emb.stats["rows"] == emb.stats["candidate_block_rows"]  # nothing to share
    torch.testing.assert_close(one, fast[:1], rtol=0, atol=0)


def test_engine_general_spaces():
    from dass_ray.core.space import SpaceConfig

    # stride-1 stage that widens (no max-pool), stride-2 stage that keeps its width, free last width,
    # a block narrower than its input in every stage
    space = SpaceConfig(name="t", base_widths=(8, 16, 16), blocks_per_stage=(2, 3, 2), strides=(1, 1, 2),
                        multipliers=(0.5, 0.75, 1.0), image_size=8, keep_last_width=False)
    archs = space.sample_many(np.random.default_rng(0), 25) + [
        ArchConfig(((8, 4), (16, 8, 12), (8, 16))), ArchConfig(((4,), (8,), (8,))), space.teacher()]
    _reference_check(space, archs, batch_size=10)


def test_engine_smaller_teacher(cpu_space):
    small = ArchConfig(tuple((w,) * 2 for w in cpu_space.stage_widths))
    archs = [a for a in cpu_space.sample_many(np.random.default_rng(1), 200) if max(a.depths) <= 2][:8]
    emb, _ = _reference_check(cpu_space, archs + [small], teacher_arch=small)
    with pytest.raises(ValueError, match="exceeds the teacher"):
        emb.embed([cpu_space.teacher()])


def test_engine_without_onednn(cpu_space, cpu_teacher, rng, monkeypatch):
    import dass_ray.core.embed as embed_mod

    monkeypatch.setattr(embed_mod, "_use_onednn", lambda: False)
    archs = cpu_space.sample_many(rng, 8) + [cpu_space.smallest()]
    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    ref = embed_reference(cpu_teacher.state_dict(), archs, cpu_space, emb.x)
    torch.testing.assert_close(emb.embed(archs), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_engine_concurrent_calls_and_pickle(cpu_space, cpu_teacher, rng):
    import pickle
    import threading

    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    sets = [cpu_space.sample_many(rng, 24) for _ in range(3)]
    expected = [emb.embed(s) for s in sets]
    got = [None] * len(sets)

    def run(i):
        for _ in range(2):
            got[i] = emb.embed(sets[i], batch_size=10)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    clone = pickle.loads(pickle.dumps(emb))
    torch.testing.assert_close(clone.embed(sets[0]), expected[0], rtol=1e-5, atol=1e-5)


def test_fast_membership_agrees_with_validate(cpu_space, cpu_teacher):
    emb = Embedder(cpu_teacher.state_dict(), cpu_space)
    r = np.random.default_rng(5)
    archs = cpu_space.sample_many(r, 200)
    bad = []
    for a in archs[:100]:
        st = [list(s) for s in a.widths]
        s = int(r.integers(len(st)))
        st[s][int(r.integers(len(st[s])))] += int(r.choice([-3, -1, 1, 5]))
        if r.random() < 0.3:
            st[s] = st[s] + [st[s][0]] * 5  # too deep
        bad.append(ArchConfig(tuple(tuple(x) for x in st)))
    bad.append(ArchConfig(archs[0].widths[:3]))  # too few stages
    for a in archs + bad:
        assert emb._fast_member(a) == cpu_space.contains(a), a
