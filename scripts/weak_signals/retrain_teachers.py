"""Retrain each weak train/val teacher exactly as labelgen does (train_teacher on CPU, seed = plan seed, the group's
teacher epochs, round_half), save under $WEAK_SIGNAL_OUT/ (default /tmp/weak_signal/) teachers/, and check it: digest vs the task row's
teacher_digest, val acc vs the row's teacher_acc, and recomputed soft labels vs the committed ones."""
import sys, time, json
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parent))
from common import *
from dass_ray.core.kd import train_teacher, round_half, evaluate, compute_soft_labels, SoftLabels, save_teacher, TeacherCheckpoint
from dass_ray.core.nets import build as build_net

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
only = sys.argv[2:]  # optional task ids
torch.set_num_threads(threads)
scale, groups, seed = plan()
sp, rows = specs(), task_rows()
space0 = get_space(scale.space)
cache = {}
(OUT / 'teachers').mkdir(exist_ok=True)
report = {}
rp = OUT / f'teacher_check_t{threads}.json'
if rp.exists():
    report = json.loads(rp.read_text())
for role, tasks in weak_tasks().items():
    for t in tasks:
        tid = t.task_id
        if only and tid not in only:
            continue
        g = group_of(tid, groups)
        tscale = g.teacher_scale(scale)
        data = task_data(sp[tid], space0.image_size, DATA_ROOT, cache)
        space = get_space(scale.space, data.num_classes)
        t0 = time.perf_counter()
        model, res = train_teacher(space, data, tscale.teacher, seed=seed, device='cpu')
        wall = time.perf_counter() - t0
        sd = round_half(model.state_dict())
        m = build_net(space.teacher(), space); m.load_state_dict(sd); m.eval()
        acc = evaluate(m, data.x_val, data.y_val)
        ck = TeacherCheckpoint(sd, space, space.teacher(), acc, data.class_names)
        dig = ck.digest()
        soft_c = SoftLabels.load(R / 'soft' / f'{tid}.parquet')
        soft_r = compute_soft_labels(m, data.x_train, views=soft_c.num_views, device='cpu')
        diff = float((soft_r.logits - soft_c.logits).abs().max())
        agree = float((soft_r.logits.argmax(-1) == soft_c.logits.argmax(-1)).float().mean())
        ok = dig == rows[tid]['teacher_digest']
        from dass_ray.core.embed import noise_input
        shape = tuple(rows[tid]['embedding_shape'])
        temb = torch.from_numpy(np.frombuffer(rows[tid]['teacher_embedding'], dtype=np.float16).astype(np.float32).reshape(shape))
        with torch.inference_mode():
            myemb = m.features(noise_input(space0, 0)).squeeze(0).to(torch.float16).float()
        emb_diff = float((myemb - temb).abs().max())
        rec = dict(role=role, epochs=tscale.teacher.epochs, n_train=len(data.y_train), wall_s=round(wall, 2),
                   digest=dig, digest_committed=rows[tid]['teacher_digest'], digest_match=ok,
                   soft_digest_meta=soft_c.meta.get('teacher'), data_fp_match=soft_c.meta.get('data') == data.fingerprint(),
                   val_acc=acc, val_acc_committed=rows[tid]['teacher_acc'], soft_max_abs_diff=diff, teacher_embedding_max_abs_diff=emb_diff, soft_argmax_agree=agree)
        report[tid] = rec
        print(tid, json.dumps(rec), flush=True)
        save_teacher(OUT / 'teachers' / f'{tid}.pt', m, space, acc, data.class_names, half=True,
                     meta={'threads': threads, **rec})
        rp.write_text(json.dumps(report, indent=1))
