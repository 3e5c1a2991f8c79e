import pytest
import torch

from dass_ray.core.nets import build
from dass_ray.core.remap import remap, remapped_student, schemes
from dass_ray.core.space import PRESETS, get_space

from conftest import randomize_bn


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_identity_remap_reproduces_teacher_logits_exactly(name):
    space = get_space(name)
    teacher = randomize_bn(build(space.teacher(), space, seed=3)).eval()
    student = remapped_student(teacher.state_dict(), space.teacher(), space.teacher(), space).eval()
    x = torch.randn(2, 3, space.image_size, space.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(teacher(x), student(x))


@pytest.mark.parametrize("scheme", schemes())
def test_every_scheme_gives_a_loadable_student(scheme, cpu_space, cpu_teacher, rng):
    for a in cpu_space.sample_many(rng, 5):
        sd = remap(cpu_teacher.state_dict(), cpu_space.teacher(), a, cpu_space, scheme)
        net = build(a, cpu_space)
        net.load_state_dict(sd)  # strict: keys and shapes match
        out = net.eval()(torch.randn(1, 3, 32, 32))
        assert out.shape == (1, 10) and torch.isfinite(out).all()


def test_first_k_slices_the_teacher(cpu_space, cpu_teacher, rng):
    a = cpu_space.sample(rng)
    sd = remap(cpu_teacher.state_dict(), cpu_space.teacher(), a, cpu_space, "first_k")
    t = cpu_teacher.state_dict()
    w, w_prev = a.widths[1][0], a.widths[0][-1]
    assert torch.equal(sd["stages.1.0.conv1.weight"], t["stages.1.0.conv1.weight"][:w, :w_prev])
    assert torch.equal(sd["stages.1.0.bn1.running_var"], t["stages.1.0.bn1.running_var"][:w])
    assert torch.equal(sd["fc.weight"], t["fc.weight"])
    last = remap(t, cpu_space.teacher(), a, cpu_space, "last_k")
    assert torch.equal(last["stages.1.0.bn1.bias"], t["stages.1.0.bn1.bias"][32 - w:])


def test_remap_does_not_alias_teacher(cpu_space, cpu_teacher):
    t = cpu_teacher.state_dict()
    sd = remap(t, cpu_space.teacher(), cpu_space.teacher(), cpu_space)
    sd["stem.conv.weight"].add_(1.0)
    assert not torch.equal(sd["stem.conv.weight"], t["stem.conv.weight"])


def test_random_scheme_is_seeded_and_ignores_teacher(cpu_space, cpu_teacher, rng):
    a = cpu_space.sample(rng)
    s1 = remap(cpu_teacher.state_dict(), cpu_space.teacher(), a, cpu_space, "random", seed=4)
    s2 = remap(cpu_teacher.state_dict(), cpu_space.teacher(), a, cpu_space, "random", seed=4)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["fc.weight"], cpu_teacher.state_dict()["fc.weight"])


def test_bad_state_dicts_are_rejected(cpu_space, cpu_teacher, rng):
    t = dict(cpu_teacher.state_dict())
    a = cpu_space.sample(rng)
    with pytest.raises(ValueError, match="unknown remapping scheme"):
        remap(t, cpu_space.teacher(), a, cpu_space, "nope")
    bad = dict(t)
    del bad["fc.bias"]
    with pytest.raises(ValueError, match="missing.*fc.bias"):
        remap(bad, cpu_space.teacher(), a, cpu_space)
    bad = dict(t)
    bad["stem.conv.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(ValueError, match="stem.conv.weight has shape"):
        remap(bad, cpu_space.teacher(), a, cpu_space)
