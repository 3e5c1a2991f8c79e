import json

import numpy as np
import pytest

from dass_ray.core.nets import build, count_flops
from dass_ray.core.space import PRESETS, ArchConfig, SpaceConfig, get_space


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_analytic_costs_match_built_network(name):
    space = get_space(name)
    archs = [space.teacher(), space.smallest()] + space.sample_many(np.random.default_rng(1), 6)
    for a in archs:
        net = build(a, space)
        assert space.params(a) == sum(p.numel() for p in net.parameters())
        assert space.flops(a) == count_flops(net)


def test_presets():
    cpu, paper = get_space("cpu"), get_space("paper")
    assert cpu.stage_widths == (16, 32, 64, 128) and cpu.image_size == 32
    assert paper.stage_widths == (32, 64, 128, 256) and paper.image_size == 64
    assert cpu.width_choices(0) == (8, 9, 10, 11, 12, 13, 14, 15, 16)
    assert len(cpu.multipliers) == 9
    with pytest.raises(ValueError, match="unknown space preset"):
        get_space("nope")


def test_teacher_is_largest_member(cpu_space, rng):
    t = cpu_space.teacher()
    assert t.depths == (5, 5, 5, 5) and cpu_space.contains(t)
    for a in cpu_space.sample_many(rng, 200):
        assert cpu_space.flops(a) <= cpu_space.flops(t)
        assert cpu_space.params(a) <= cpu_space.params(t)


def test_json_roundtrip_hash_and_immutability(cpu_space, rng):
    a = cpu_space.sample(rng)
    b = ArchConfig.from_json(a.to_json())
    assert a == b and hash(a) == hash(b) and a.digest() == b.digest()
    assert json.loads(a.to_json())["widths"][0] == list(a.widths[0])
    with pytest.raises(Exception):
        a.widths = ()  # frozen
    assert SpaceConfig.from_dict(json.loads(json.dumps(cpu_space.to_dict()))) == cpu_space


def test_sampling_is_seeded_and_pure(cpu_space):
    a = cpu_space.sample_many(np.random.default_rng(7), 50)
    b = cpu_space.sample_many(np.random.default_rng(7), 50)
    c = cpu_space.sample_many(np.random.default_rng(8), 50)
    assert a == b and a != c
    assert len(set(a)) == 50
    assert all(cpu_space.contains(x) for x in a)
    assert all(x.widths[-1][-1] == 128 for x in a)  # last block keeps the teacher's final width


def test_budget(cpu_space, rng):
    budget = cpu_space.flops(cpu_space.teacher()) * 0.3
    archs = cpu_space.sample_many(rng, 30, max_flops=budget, max_params=600_000)
    assert all(cpu_space.flops(a) <= budget and cpu_space.params(a) <= 600_000 for a in archs)
    with pytest.raises(ValueError, match="impossible budget"):
        cpu_space.sample_many(rng, 3, max_flops=1000)
    with pytest.raises(ValueError, match="max_params must be > 0"):
        cpu_space.check_budget(max_params=-5)


def test_mutate_returns_new_member(cpu_space, rng):
    a = cpu_space.sample(rng)
    b = cpu_space.mutate(a, rng, n_changes=3)
    assert cpu_space.contains(b) and cpu_space.contains(a)


def test_validation_names_the_problem(cpu_space):
    with pytest.raises(ValueError, match="stage 1 block 0: width 7"):
        cpu_space.validate(ArchConfig(((16,), (7,), (64,), (128,))))
    with pytest.raises(ValueError, match="depth 6"):
        cpu_space.validate(ArchConfig(((16,) * 6, (32,), (64,), (128,))))
    with pytest.raises(ValueError, match="final width"):
        cpu_space.validate(ArchConfig(((16,), (32,), (64,), (64,))))
    with pytest.raises(ValueError, match="at least one block"):
        ArchConfig(((16,), (), (64,), (128,)))


def test_encoding_layout_and_roundtrip(cpu_space, rng):
    assert cpu_space.encoding_size == 20 + 20 * 9
    for a in cpu_space.sample_many(rng, 50) + [cpu_space.teacher()]:
        v = cpu_space.encode(a)
        assert v.shape == (cpu_space.encoding_size,) and v.sum() == 4 + sum(a.depths)
        assert cpu_space.decode(v) == a
    layout = cpu_space.encoding_layout()
    assert layout["size"] == cpu_space.encoding_size and layout["width_onehot"][3][-1] == 128
