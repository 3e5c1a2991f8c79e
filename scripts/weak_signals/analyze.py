"""Spearman of each signal with the label (label='mean') per weak train/val task, beside dass / teacher_likeness /
params / flops from artifacts/order_fit.json (recomputed here too, as a check); correlations of each signal with
the predictor's score and with params; per-student costs. Writes $WEAK_SIGNAL_OUT/ (default /tmp/weak_signal/) results.json."""
import sys, json
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from common import *
from dass_ray.core.meta import load_predictor, spearman
from dass_ray.offline.metatrain import predict_task

SIGNALS = ['pre_val_acc', 'pre_train_acc', 'pre_agree', 'neg_kd_loss', 'neg_kd_loss_bn',
           'neg_loss_s1', 'val_acc_s1', 'neg_loss_s5', 'val_acc_s5']
COST = {'pre_val_acc': ['t_init', 't_val'], 'pre_train_acc': ['t_init', 't_train'], 'pre_agree': ['t_init', 't_train'],
        'neg_kd_loss': ['t_init', 't_train'], 'neg_kd_loss_bn': ['t_init', 't_bn'],
        'neg_loss_s1': ['t_init', 't_s1_train', 't_s1_eval'], 'val_acc_s1': ['t_init', 't_s1_train', 't_s1_eval'],
        'neg_loss_s5': ['t_init', 't_s5_train', 't_s5_eval'], 'val_acc_s5': ['t_init', 't_s5_train', 't_s5_eval']}
of = json.loads((ROOT / 'artifacts' / 'order_fit.json').read_text())
model, _ = load_predictor(ROOT / 'dass_ray' / 'assets' / 'predictor' / 'cpu.pt', get_space('cpu'))
res = {'label': 'mean', 'signals': SIGNALS, 'roles': {}}
TASKS, SIGV = {}, {}


def tl(t):
    return torch.nn.functional.cosine_similarity(t.maps.flatten(1), t.teacher_map.flatten(1)).numpy()


for role, tasks in weak_tasks().items():
    TASKS[role] = tasks
    per, costs = {}, {k: [] for k in SIGNALS}
    kd_wall = []
    for t in tasks:
        fp = OUT / 'signals' / f'{t.task_id}.json'
        if not fp.exists():
            continue
        rec = json.loads(fp.read_text())
        fq = OUT / 'signals_proxy' / f'{t.task_id}.json'  # the short-run proxy, run separately (PROXY_ONLY)
        if fq.exists():
            for s, q in zip(rec['students'], json.loads(fq.read_text())['students']):
                for k, v in q.items():
                    if k != 't_init':
                        s.setdefault(k, v)
        y = t.acc.numpy()
        dass = predict_task(model, t)
        base = {'dass': dass, 'teacher_likeness': tl(t), 'params': t.params.astype(float), 'flops': t.flops.astype(float)}
        row = {'n_students': len(y), 'n_train': rec['n_train'], 'kd_total_steps': rec['kd_total_steps'],
               'teacher_acc': t.teacher_acc, 'num_classes': t.num_classes, 'label_seeds': t.label_seeds,
               'order_fit': {k: of['roles'][role]['weak'][k]['per_task'].get(t.task_id)
                             for k in ('dass', 'teacher_likeness', 'params', 'flops')},
               'label': {k: spearman(v, y) for k, v in base.items()}}
        sig = {k: np.array([s[k] for s in rec['students']]) for k in SIGNALS if k in rec['students'][0]}
        row['label'].update({k: spearman(v, y) for k, v in sig.items()})
        SIGV[t.task_id] = sig
        row['vs_dass'] = {k: spearman(v, dass) for k, v in sig.items()}
        row['vs_params'] = {k: spearman(v, base['params']) for k, v in sig.items()}
        row['vs_teacher_likeness'] = {k: spearman(v, base['teacher_likeness']) for k, v in sig.items()}
        row['signal_distinct_values'] = {k: int(len(np.unique(np.round(v, 6)))) for k, v in sig.items()}
        for k in sig:
            costs[k] += [sum(s[c] for c in COST[k]) for s in rec['students']]
        per[t.task_id] = row
    summ = {}
    for k in ['dass', 'teacher_likeness', 'params', 'flops'] + SIGNALS:
        v = np.array([per[i]['label'][k] for i in per if k in per[i]['label']], float)
        if not len(v):
            continue
        fin = np.isfinite(v)
        summ[k] = {'mean': float(np.mean(v[fin])) if fin.any() else None, 'mean_nan_as_0': float(np.mean(np.where(fin, v, 0))),
                   'below_zero': int((v[fin] < 0).sum()), 'nan': int((~fin).sum()), 'tasks': len(v)}
        if k in SIGNALS:
            for c in ('vs_dass', 'vs_params', 'vs_teacher_likeness'):
                w = np.array([per[i][c][k] for i in per if k in per[i][c]], float)
                summ[k][f'mean_{c}'] = float(np.nanmean(w))
            summ[k]['cost_s_per_student_mean'] = float(np.mean(costs[k]))
            summ[k]['cost_s_per_student_median'] = float(np.median(costs[k]))
    res['roles'][role] = {'tasks': len(per), 'summary': summ, 'per_task': per}

Path(OUT / 'results.json').write_text(json.dumps(res, indent=1, default=float))
cols = ['dass', 'teacher_likeness', 'params'] + SIGNALS
import os
if os.environ.get('NO_PROXY'): cols = cols[:8]; SIGNALS = SIGNALS[:5]
short = {'teacher_likeness': 'tlike', 'pre_val_acc': 'valacc', 'pre_train_acc': 'tracc', 'pre_agree': 'agree',
         'neg_kd_loss': '-kdl', 'neg_kd_loss_bn': '-kdl_bn', 'neg_loss_s1': '-l_s1', 'val_acc_s1': 'va_s1',
         'neg_loss_s5': '-l_s5', 'val_acc_s5': 'va_s5'}
for role, r in res['roles'].items():
    print(f"\n## {role} (weak tasks: {r['tasks']})")
    print('| task | steps | ' + ' | '.join(short.get(c, c) for c in cols) + ' |')
    print('|' + '---|' * (len(cols) + 2))
    for tid, row in r['per_task'].items():
        print(f"| {tid} | {row['kd_total_steps']} | " + ' | '.join((f"{row['label'][c]:.3f}" if np.isfinite(row['label'][c]) else 'nan') if c in row['label'] else '-' for c in cols) + ' |')
    s = r['summary']
    print('| **mean** | | ' + ' | '.join(f"**{s[c]['mean']:.3f}**" if s[c]['mean'] is not None else '-' for c in cols) + ' |')
    print('| tasks | | ' + ' | '.join(str(s[c]['tasks']) for c in cols) + ' |')
    print('| below 0 (nan) | | ' + ' | '.join(f"{s[c]['below_zero']} ({s[c]['nan']})" for c in cols) + ' |')
    print('| rho vs dass | | | | | ' + ' | '.join(f"{s[c]['mean_vs_dass']:.3f}" for c in SIGNALS) + ' |')
    print('| rho vs params | | | | | ' + ' | '.join(f"{s[c]['mean_vs_params']:.3f}" for c in SIGNALS) + ' |')
    print('| rho vs tlike | | | | | ' + ' | '.join(f"{s[c]['mean_vs_teacher_likeness']:.3f}" for c in SIGNALS) + ' |')
    print('| cost s/student | | | | | ' + ' | '.join(f"{s[c]['cost_s_per_student_mean']:.3f}" for c in SIGNALS) + ' |')

# paired comparison with dass over the weak tasks of both roles (signals minus dass, per task), and a
# sign-flip permutation p-value (two-sided) of the mean difference; plus, post hoc, the rank average of dass and
# each signal (not a pre-registered candidate: read as a hint only)
from dass_ray.core.meta import _rank
rng = np.random.default_rng(0)
paired = {}
print('\n## paired vs dass (per task: signal Spearman minus dass Spearman)')
print('| signal | role | mean diff | wins/losses | sign-flip p | combo(dass+signal ranks) mean | combo below 0 |')
print('|---|---|---|---|---|---|---|')
for k in SIGNALS:
    for role in list(res['roles']) + ['both']:
        rows = [(tid, r) for ro in res['roles'] for tid, r in res['roles'][ro]['per_task'].items()
                if (role == 'both' or ro == role) and k in r['label']]
        if not rows:
            continue
        d = np.array([np.nan_to_num(r['label'][k]) - r['label']['dass'] for _, r in rows])
        flips = rng.choice([-1, 1], size=(20000, len(d)))
        p = float(np.mean(np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12))
        combo = []
        for tid, r in rows:
            ro = tid.split('-')[0]
            t = next(t for t in TASKS[ro] if t.task_id == tid)
            dass = predict_task(model, t)
            sig = SIGV[tid][k]
            combo.append(spearman(_rank(dass) + _rank(sig), t.acc.numpy()))
        combo = np.array(combo)
        paired[f'{k}/{role}'] = {'mean_diff': float(d.mean()), 'wins': int((d > 0).sum()), 'losses': int((d < 0).sum()),
                                 'sign_flip_p': p, 'combo_mean': float(np.nanmean(combo)),
                                 'combo_below_zero': int((combo < 0).sum()), 'combo_per_task': dict(zip([x for x, _ in rows], combo.tolist()))}
        print(f"| {k} | {role} | {d.mean():+.3f} | {(d > 0).sum()}/{(d < 0).sum()} | {p:.3f} | {np.nanmean(combo):.3f} | {(combo < 0).sum()} |")
res['paired_vs_dass'] = paired
Path(OUT / 'results.json').write_text(json.dumps(res, indent=1, default=float))
