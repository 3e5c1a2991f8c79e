"""Pre-distillation signals per student on weak train/val tasks (never test), from the remapped initialisation
(dass_ray.core.kd.init_student, scheme = KD config's remap, seed = plan seed 0) of the retrained teacher in
$WEAK_SIGNAL_OUT/ (default /tmp/weak_signal/) teachers/ and the COMMITTED soft labels (artifacts/metadataset/soft/<task>.parquet).

Per student (eval-mode BN unless noted):
  pre_val_acc      accuracy on the task's validation split
  pre_train_acc    accuracy on the training split (identity view)
  pre_agree        argmax agreement with the teacher's soft labels, training images, both views
  neg_kd_loss      minus kd_loss(alpha, T of the KD config) vs the soft labels, training images, both views
  neg_kd_loss_bn   the same in train-mode BN (batch statistics), batches of the KD batch size in the run's epoch-0
                   order and flips: the loss the first distillation steps actually see (no updates)
  neg_loss_s1/s5   minus the eval-mode full-training-set KD loss after 1 / 5 SGD steps of the run's own KD loop
  val_acc_s1/s5    validation accuracy after 1 / 5 steps
Writes $WEAK_SIGNAL_OUT/ (default /tmp/weak_signal/) signals/<task>.json incrementally.
"""
import sys, time, json, math
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from common import *
import torch.nn.functional as F
from dass_ray.core.kd import init_student, kd_loss, load_teacher, SoftLabels, _flip, _cosine

import os
PROXY_STEPS = tuple(int(x) for x in os.environ.get('PROXY_STEPS', '1,5').split(',') if x)  # empty: no proxy
SIG_DIR = os.environ.get('SIG_DIR', 'signals')
PROXY_ONLY = bool(os.environ.get('PROXY_ONLY'))  # only the short-run proxy (another SIG_DIR; analyze.py merges)
scale, groups, SEED = plan()
cfg = scale.kd
sp = specs()
space0 = get_space(scale.space)
cache = {}
(OUT / SIG_DIR).mkdir(exist_ok=True)
only = sys.argv[1:]


@torch.no_grad()
def eval_all(model, data, soft):
    """val acc, train acc (identity), agreement and KD loss over both views (eval-mode BN)."""
    model.eval()
    t0 = time.perf_counter()
    val_acc = float((model(data.x_val).argmax(1) == data.y_val).float().mean())
    t_val = time.perf_counter() - t0
    t0 = time.perf_counter()
    agree, loss, n = 0.0, 0.0, 0
    tr_acc = None
    for v in range(soft.num_views):
        x = data.x_train.flip(3) if v == 1 else data.x_train
        lg = model(x)
        tl = soft.logits[v]
        if v == 0:
            tr_acc = float((lg.argmax(1) == data.y_train).float().mean())
        agree += float((lg.argmax(1) == tl.argmax(1)).float().sum())
        loss += float(kd_loss(lg, tl, data.y_train, cfg.alpha, cfg.temperature)['loss']) * len(x)
        n += len(x)
    t_train = time.perf_counter() - t0
    return dict(val_acc=val_acc, train_acc=tr_acc, agree=agree / n, kd_loss=loss / n), t_val, t_train


def epoch0_batches(n):
    g = torch.Generator().manual_seed(int(SEED) * 1000003 + 0)
    perm = torch.randperm(n, generator=g)
    flips_all = (torch.rand(n, generator=g) < 0.5) if cfg.flip else torch.zeros(n, dtype=torch.bool)
    return [(perm[i:i + cfg.batch_size], flips_all[perm[i:i + cfg.batch_size]]) for i in range(0, n, cfg.batch_size)]


@torch.no_grad()
def bn_train_loss(model, data, soft):
    model.train()
    tot, n = 0.0, 0
    for idx, fl in epoch0_batches(len(data.y_train)):
        xb = _flip(data.x_train[idx], fl)
        l = kd_loss(model(xb), soft.lookup(idx, fl), data.y_train[idx], cfg.alpha, cfg.temperature)['loss']
        tot += float(l) * len(idx); n += len(idx)
    return tot / n


def proxy(model, data, soft):
    """The KD run's own loop (same optimizer, schedule, batch order) stopped after max(PROXY_STEPS) steps."""
    n = len(data.y_train)
    spe = max(1, math.ceil(n / cfg.batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _cosine(cfg.epochs * spe))
    out, step, epoch = {}, 0, 0
    t_train = 0.0
    while step < max(PROXY_STEPS):
        g = torch.Generator().manual_seed(int(SEED) * 1000003 + epoch)
        perm = torch.randperm(n, generator=g)
        flips_all = (torch.rand(n, generator=g) < 0.5) if cfg.flip else torch.zeros(n, dtype=torch.bool)
        for i in range(0, n, cfg.batch_size):
            t0 = time.perf_counter()
            model.train()
            idx = perm[i:i + cfg.batch_size]; fl = flips_all[idx]
            xb = _flip(data.x_train[idx], fl)
            loss = kd_loss(model(xb), soft.lookup(idx, fl), data.y_train[idx], cfg.alpha, cfg.temperature)['loss']
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step()
            step += 1
            t_train += time.perf_counter() - t0
            if step in PROXY_STEPS:
                e, tv, tt = eval_all(model, data, soft)
                out[f's{step}'] = dict(neg_loss=-e['kd_loss'], val_acc=e['val_acc'], train_s=t_train, eval_s=tv + tt)
            if step >= max(PROXY_STEPS):
                break
        epoch += 1
    return out, spe * cfg.epochs


for role, tasks in weak_tasks().items():
    for t in tasks:
        tid = t.task_id
        if only and tid not in only:
            continue
        fp = OUT / SIG_DIR / f'{tid}.json'
        if fp.exists():
            continue
        data = task_data(sp[tid], space0.image_size, DATA_ROOT, cache)
        ck = load_teacher(OUT / 'teachers' / f'{tid}.pt')
        space = get_space(scale.space, data.num_classes)
        soft = SoftLabels.load(R / 'soft' / f'{tid}.parquet', expect={'data': data.fingerprint()})
        rec = {'role': role, 'n_train': len(data.y_train), 'n_val': len(data.y_val), 'students': []}
        T0 = time.perf_counter()
        for arch in t.archs:
            s = {}
            t0 = time.perf_counter()
            st = init_student(arch, space, ck.state_dict, ck.arch, cfg.remap, SEED)
            s['t_init'] = time.perf_counter() - t0
            if not PROXY_ONLY:
                e, tv, tt = eval_all(st, data, soft)
                s.update(pre_val_acc=e['val_acc'], pre_train_acc=e['train_acc'], pre_agree=e['agree'],
                         neg_kd_loss=-e['kd_loss'], t_val=tv, t_train=tt)
                t0 = time.perf_counter()
                s['neg_kd_loss_bn'] = -bn_train_loss(st, data, soft)
                s['t_bn'] = time.perf_counter() - t0
            total_steps = max(1, math.ceil(len(data.y_train) / cfg.batch_size)) * cfg.epochs
            pr = {}
            if PROXY_STEPS:
                if not PROXY_ONLY:
                    st = init_student(arch, space, ck.state_dict, ck.arch, cfg.remap, SEED)
                pr, total_steps = proxy(st, data, soft)
            for k, v in pr.items():
                s[f'neg_loss_{k}'] = v['neg_loss']; s[f'val_acc_{k}'] = v['val_acc']
                s[f't_{k}_train'] = v['train_s']; s[f't_{k}_eval'] = v['eval_s']
            rec['students'].append(s)
        rec['kd_total_steps'] = total_steps
        rec['wall_s'] = time.perf_counter() - T0
        fp.write_text(json.dumps(rec))
        print(tid, role, f"{rec['wall_s']:.1f}s", flush=True)
