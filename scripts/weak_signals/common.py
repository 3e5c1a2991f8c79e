"""Shared: the weak train/val tasks, exactly as scripts/fit_order.py picks them (label='mean', roles train/val only)."""
import json, os
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np, torch
torch.set_num_threads(1)
from pathlib import Path
from dass_ray.core.ranking import SIZE_BLEND_STRENGTH, teacher_strength
from dass_ray.offline.metadataset import load_meta_tasks, MetaDatasetStore, task_data
from dass_ray.offline.plans import TaskGroup
from dass_ray.core.tasks import load_tasks
from dass_ray.core.config import ScaleConfig
from dass_ray.core.space import get_space

ROOT = Path(__file__).resolve().parents[2]  # the repository
R = ROOT / 'artifacts' / 'metadataset'
DATA_ROOT = os.environ.get('DASS_DATA_ROOT', str(ROOT.parent / 'shared' / 'datasets'))
OUT = Path(os.environ.get('WEAK_SIGNAL_OUT', '/tmp/weak_signal'))  # teachers (84 MB, not committed), per-student signals
OUT.mkdir(parents=True, exist_ok=True)


def plan():
    p = json.loads((R / 'plan.json').read_text())
    groups = [TaskGroup(**{**g, 'class_pool': tuple(g['class_pool']) if g['class_pool'] else None}) for g in p['groups']]
    from dass_ray.core.config import get_scale
    scale = get_scale('cpu')
    assert scale.to_dict() == p['scale'], 'plan scale differs from SCALES[cpu]'
    return scale, groups, p['seed']


def weak_tasks(roles=('train', 'val')):
    """{role: [MetaTask]} of weak tasks (never 'test')."""
    assert 'test' not in roles
    out = {}
    for role in roles:
        tasks = [t for t in load_meta_tasks(R, (role,), label='mean') if np.ptp(t.acc.numpy()) > 0]
        out[role] = [t for t in tasks if teacher_strength(t.teacher_acc, t.num_classes) < SIZE_BLEND_STRENGTH]
    return out


def specs():
    return {t.task_id: t for t in load_tasks(R / 'tasks.json')}


def task_rows():
    return {r['task_id']: r for r in MetaDatasetStore(R).task_rows().to_pylist()}


def group_of(task_id, groups):
    g = [g for g in groups if task_id.startswith(g.prefix + '-')]
    assert len(g) == 1, (task_id, g)
    return g[0]
