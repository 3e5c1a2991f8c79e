import numpy as np
import pytest
import torch

from dass_ray.embed import Embedder, embed_reference, noise_input
from dass_ray.nets import build
from dass_ray.space import ArchConfig, get_space

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
