"""Label generation on Ray: teachers with Ray Train, soft labels once per task, student KD runs as Ray tasks.

Thin orchestration over `kd` and `metadataset`. Resumable: a task whose teacher checkpoint exists is not
retrained; a student whose (task, arch, seed) row exists is not rerun; each finished student is appended at once,
so killing the driver loses at most the runs in flight.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from dass_ray.fileutil import resolve_storage
from dass_ray.core.config import ScaleConfig
from dass_ray.core.tasks import TaskSpec, load_tasks, save_tasks
from dass_ray.core.embed import noise_input
from dass_ray.core.kd import (SoftLabels, TensorData, TrainResult, compute_soft_labels, load_teacher, round_half, save_teacher,
                         train_teacher)
from dass_ray.offline.metadataset import MetaDatasetStore, TaskContext, atomic_write_text, code_version, machine, run_key, run_student, student_plan, student_row, task_data
from dass_ray.offline.plans import TaskGroup, make_tasks
from dass_ray.search.resources import max_cluster_cpus, ray_options, scaling_config_kwargs
from dass_ray.search.rayutil import Progress, quick_train_polls, worker_device
from dass_ray.core.ranking import near_chance
from dass_ray.core.space import get_space

# ----------------------------------------------------------------------------------------------------------------
# Teachers (Ray Train)
# ----------------------------------------------------------------------------------------------------------------


def _teacher_loop(config: dict) -> None:
    """Ray Train worker loop: train one teacher, report per-epoch metrics, the final weights as a checkpoint."""
    import ray.train

    torch.set_num_threads(config["threads"])
    scale: ScaleConfig = config["scale"]

    class _Rep:
        def report(self, metrics, state):
            if ray.train.get_context().get_world_rank() == 0 and metrics["epoch"] < scale.teacher.epochs:
                ray.train.report({k: float(v) for k, v in metrics.items()})

    model, res = train_teacher(config["space"], config["data"], scale.teacher, seed=config["seed"],
                               reporter=_Rep(), device=worker_device())
    with tempfile.TemporaryDirectory() as d:
        torch.save({"state_dict": model.state_dict(), "result": res.summary()}, Path(d) / "teacher.pt")
        ray.train.report({"best_acc": res.best_acc, "final_acc": res.final_acc, "epoch": res.epochs},
                         checkpoint=ray.train.Checkpoint.from_directory(d))


def train_teacher_on_ray(task: TaskSpec, data: TensorData, scale: ScaleConfig, storage: str | Path, seed: int = 0,
                         cpus: int = 1) -> tuple[dict, dict]:
    """Train a task's teacher with a one-worker `TorchTrainer`; returns (state_dict, result summary)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    space = get_space(scale.space, data.num_classes)
    quick_train_polls()
    trainer = TorchTrainer(
        _teacher_loop,
        train_loop_config={"scale": scale, "space": space, "data": data, "seed": seed, "threads": cpus},
        scaling_config=ScalingConfig(num_workers=1, **scaling_config_kwargs("teacher_train", num_cpus=cpus)),
        run_config=RunConfig(name=f"teacher-{task.task_id}",
                             storage_path=resolve_storage(str(storage), Path(storage))),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"teacher training for {task.task_id} failed: {result.error}")
    with result.checkpoint.as_directory() as d:
        blob = torch.load(Path(d) / "teacher.pt", map_location="cpu", weights_only=False)
    return blob["state_dict"], blob["result"]


@ray.remote(num_cpus=0, max_retries=0)
def _teacher_remote(task: TaskSpec, data: TensorData, scale: ScaleConfig, storage: str, seed: int,
                    cpus: int) -> tuple[dict, dict, float]:
    """Drive one teacher's Ray Train run from a task (no CPU of its own), so several teachers train at once."""
    t0 = time.perf_counter()
    sd, summ = train_teacher_on_ray(task, data, scale, storage, seed=seed, cpus=cpus)
    return sd, summ, time.perf_counter() - t0


def _save_trained_teacher(tp: Path, task: TaskSpec, data: TensorData, scale: ScaleConfig, sd: dict, summ: dict,
                          wall: float) -> float:
    """Round to half precision (what is stored is what every later stage uses), evaluate, save atomically;
    returns the validation accuracy."""
    from dass_ray.core.kd import evaluate
    from dass_ray.core.nets import build as build_net

    sd = round_half(sd)
    space = get_space(scale.space, data.num_classes)
    model = build_net(space.teacher(), space)
    model.load_state_dict(sd)
    acc = evaluate(model, data.x_val, data.y_val)
    save_teacher(tp, model, space, acc, data.class_names, half=True,
                 meta={"task": task.to_dict(), "train": summ, "wall_s": wall, "code_version": code_version()})
    return acc


# ----------------------------------------------------------------------------------------------------------------
# Students (Ray tasks)
# ----------------------------------------------------------------------------------------------------------------


@ray.remote(max_retries=2)
def _student_remote(ctx: TaskContext, arch_json: str, scale: ScaleConfig, seed: int, replicate: int) -> dict:
    from dass_ray.core.space import ArchConfig

    return run_student(ctx, ArchConfig.from_json(arch_json), scale, seed, replicate, threads=scale.threads_per_run,
                       device=worker_device())


def build(output: str | Path, scale: ScaleConfig, groups: list[TaskGroup], *, data_root: str | Path | None = None,
          seed: int = 0, max_runs: int | None = None, teacher_cpus: int = 1, command: str = "",
          storage: str | None = None, max_inflight: int | None = None, teacher_parallel: int | None = None,
          log=print) -> dict:
    """Build (or continue) a meta-dataset in `output`. Returns a summary dict.

    `storage`: where Ray Train keeps the teachers' checkpoints -- on a multi-node cluster a directory every node
    mounts or a URI (s3://...); default `<output>/ray_train` (one machine). `max_inflight`: student runs queued
    at once (default: twice the CPUs the cluster has or can autoscale to). `teacher_parallel`: teachers trained
    at once (default: the CPUs the cluster has or can autoscale to // `teacher_cpus`)."""
    t_start = time.time()
    session_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(t_start))}-{os.getpid()}"
    store = MetaDatasetStore(output)
    plan = {"scale": scale.to_dict(), "groups": [g.to_dict() for g in groups], "seed": seed}
    tasks_file = store.root / "tasks.json"
    roles_file = store.root / "roles.json"
    pairs = make_tasks(groups, scale, data_root)
    tasks = [t for t, _ in pairs]
    group_of = {t.task_id: g for t, g in pairs}
    roles = {t.task_id: g.role for t, g in pairs}
    if tasks_file.exists():  # a resume, or a plan that extends this directory's: every recorded task must stay
        new = {t.task_id: t for t in tasks}
        for t in load_tasks(tasks_file):
            if t.task_id not in new:
                raise ValueError(f"{store.root}: the plan drops task {t.task_id!r} recorded here; a plan may only "
                                 f"add tasks (use a new --output for another plan)")
            if new[t.task_id].to_dict() != t.to_dict():
                raise ValueError(f"{store.root}: the plan changes the images of task {t.task_id!r} recorded here "
                                 f"(its classes, sizes or seed); use a new --output for another plan")
    store.init(plan)  # checked before anything is written: a refused plan leaves the directory as it was
    save_tasks(tasks_file, tasks)
    roles_file.write_text(json.dumps(roles, indent=1))
    for row in store.task_rows().to_pylist():  # a plan may move a recorded task to another role
        if row["task_id"] in roles and row["role"] != roles[row["task_id"]]:
            log(f"[plan] {row['task_id']}: role {row['role']} -> {roles[row['task_id']]}")
            store.put_task({**row, "role": roles[row["task_id"]]})
    cache: dict = {}
    space0 = get_space(scale.space)
    probe = noise_input(space0, 0)

    # 1. the plan: every task's students, and what is still to run. Only tasks with work left (or no task row
    # yet) need their teacher, so a finished task's teacher may be absent (it is not shipped) on a resume.
    timings = {"teachers_s": 0.0, "students_s": 0.0}
    done_tasks = {r["task_id"] for r in store.task_rows().to_pylist()}
    spaces = {t.task_id: get_space(scale.space, task_data(t, space0.image_size, data_root, cache).num_classes)
              for t in tasks}
    done = store.done_keys()
    jobs, per_task = [], {}
    for task in tasks:
        per_task[task.task_id] = student_plan(task, spaces[task.task_id], group_of[task.task_id].num_students(scale),
                                              seed)
    # streams: each task's students, and each test task's noise-ceiling replicates (second seed); taken
    # round-robin so that a partial build has every task (and the noise ceiling) at a similar count
    streams = [[(t.task_id, a, seed, 0) for a in per_task[t.task_id]] for t in tasks]
    streams += [[(t.task_id, a, seed + 1, 1) for a in per_task[t.task_id][:group_of[t.task_id].num_second_seed(scale)]]
                for t in tasks if group_of[t.task_id].num_second_seed(scale)]
    for j in range(max(len(s) for s in streams)):
        jobs.extend(s[j] for s in streams if j < len(s))
    todo = [j for j in jobs if run_key(j[0], j[1].digest(), j[2]) not in done]
    n_recorded = len(jobs) - len(todo)
    if max_runs is not None:
        todo = todo[:max_runs]
    needed = {j[0] for j in todo} | {t.task_id for t in tasks if t.task_id not in done_tasks}
    active = [(i, t) for i, t in enumerate(tasks) if t.task_id in needed]

    # 2. one loop over teachers and students: missing teachers train (up to `teacher_parallel` Ray Train runs at
    # once, each saved as it finishes), and a task's students start as soon as its teacher, soft labels and task
    # row are ready -- a long build labels students while later teachers still train.
    # resolved here (a URI as is, a path made absolute): the Train runs are driven from worker processes
    storage = resolve_storage(storage, store.root / "ray_train")
    contexts: dict[str, TaskContext] = {}
    ctx_refs: dict = {}

    def prepare_task(task: TaskSpec) -> None:
        """Soft labels once, the teacher's embedding (task row), the context shipped to the task's student runs."""
        data = task_data(task, space0.image_size, data_root, cache)
        space = spaces[task.task_id]
        ck = load_teacher(store.teacher_path(task.task_id))
        soft_path = store.root / "soft" / f"{task.task_id}.parquet"
        expect = {"teacher": ck.digest(), "data": data.fingerprint()}
        if soft_path.exists():
            soft = SoftLabels.load(soft_path, expect=expect)
        else:
            soft = compute_soft_labels(ck.model(), data.x_train, views=2 if scale.kd.flip else 1, meta=expect)
            soft.save(soft_path)
        if task.task_id not in done_tasks:
            with torch.inference_mode():
                tmap = ck.model().features(probe)
            store.put_task({
                "task_id": task.task_id, "role": roles[task.task_id], "source": task.source,
                "num_classes": data.num_classes, "teacher_acc": ck.val_acc, "teacher_digest": ck.digest(),
                "teacher_embedding": tmap.squeeze(0).to(torch.float16).numpy().tobytes(),
                "embedding_shape": list(tmap.shape[1:]), "train_wall_s": float(ck.meta.get("wall_s", 0.0)),
                "space_json": json.dumps(space.to_dict()),
            })
        contexts[task.task_id] = TaskContext(task.task_id, roles[task.task_id], task.source, space, ck.state_dict,
                                             ck.val_acc, data, soft)
        ctx_refs[task.task_id] = ray.put(contexts[task.task_id])

    missing = [(i, t) for i, t in active if not store.teacher_path(t.task_id).exists()]
    for _, t in active:
        if store.teacher_path(t.task_id).exists():
            prepare_task(t)
    par = teacher_parallel or max(1, max_cluster_cpus() // max(1, teacher_cpus))
    teacher_queue = list(missing)
    teachers: dict = {}

    def submit_teacher() -> None:
        i, task = teacher_queue.pop(0)
        data = task_data(task, space0.image_size, data_root, cache)
        tscale = group_of[task.task_id].teacher_scale(scale)
        log(f"[teacher {i + 1}/{len(tasks)}] {task.task_id}: training ({tscale.teacher.epochs} epochs, "
            f"{len(data.y_train)} images) with Ray Train")
        teachers[_teacher_remote.remote(task, data, tscale, storage, seed, teacher_cpus)] = (i, task, data)

    while teacher_queue and len(teachers) < par:
        submit_teacher()

    log(f"[students] {n_recorded}/{len(jobs)} already recorded; running {len(todo)}")
    # Twice the CPUs the cluster has or can autoscale to: enough queued demand for the autoscaler to see. While
    # teachers train, only the CPUs they leave are queued, so student runs never starve a teacher's placement.
    max_inflight = max_inflight or max(2, 2 * max_cluster_cpus())
    opts = ray_options("kd_trial")
    t0 = time.perf_counter()
    prog = Progress(len(todo), "students")
    pending: dict = {}
    queued = list(todo)
    failed = ran = 0
    last_manifest = time.monotonic()

    def fill() -> None:
        cap = max_inflight if not teachers and not teacher_queue else \
            max(0, min(max_inflight, max_cluster_cpus() - len(teachers) * teacher_cpus))
        k = 0
        while len(pending) < cap and k < len(queued):
            tid, arch, s, rep = queued[k]
            if tid not in ctx_refs:  # its teacher is not ready yet: keep its place in the order
                k += 1
                continue
            queued.pop(k)
            ref = _student_remote.options(**opts).remote(ctx_refs[tid], arch.to_json(), scale, s, rep)
            pending[ref] = (tid, arch, s, rep)

    fill()
    while pending or teachers:
        (ref,), _ = ray.wait(list(teachers) + list(pending), num_returns=1)
        if ref in teachers:
            i, task, data = teachers.pop(ref)
            sd, summ, wall = ray.get(ref)  # a failed teacher stops the build: its task would have no labels
            acc = _save_trained_teacher(store.teacher_path(task.task_id), task, data, scale, sd, summ, wall)
            timings["teachers_s"] += wall
            log(f"[teacher {i + 1}/{len(tasks)}] {task.task_id}: val acc {acc:.3f} ({wall:.0f}s)")
            warning = near_chance_warning(acc, data.num_classes)
            if warning:
                log(f"[teacher {i + 1}/{len(tasks)}] {task.task_id}: warning: {warning}")
            if teacher_queue:
                submit_teacher()
            prepare_task(task)
        else:
            tid, arch, s, rep = pending.pop(ref)
            try:
                row = ray.get(ref)
            except Exception as e:  # the worker died beyond its retries: record it, keep going
                row = run_student_failed(contexts[tid], arch, s, rep, f"{type(e).__name__}: {e}")
            failed += row["status"] != "ok"
            ran += 1
            store.append([row])
            prog.update(1, f"{tid} acc={row['best_acc']:.3f} failed={failed}")
        fill()
        if time.monotonic() - last_manifest > MANIFEST_EVERY_S:  # a killed build still leaves its manifest entry
            _write_manifest(store, command, timings, time.time() - t_start, ran, failed, session_id)
            last_manifest = time.monotonic()
    prog.close()
    timings["students_s"] = time.perf_counter() - t0
    return _write_manifest(store, command, timings, time.time() - t_start, ran, failed, session_id, done=True)


def near_chance_warning(acc: float, num_classes: int) -> str | None:
    """A line for a teacher that has gone less than a quarter of the way from chance to perfect, else None: its
    soft labels carry little beyond the hard labels, so its students' KD accuracies say little about distillation."""
    if near_chance(acc, num_classes):
        return (f"the teacher's validation accuracy {acc:.3f} is near chance ({1.0 / num_classes:.3f} for "
                f"{num_classes} classes); its students are labelled anyway")
    return None


def run_student_failed(ctx: TaskContext, arch, seed: int, rep: int, reason: str) -> dict:
    """A failed row for a run whose worker could not return one (it died beyond its retries)."""
    return student_row(ctx, arch, seed, rep, TrainResult("failed", 0.0, 0.0, 0, 0.0, reason=reason), 0.0)


MANIFEST_EVERY_S = 120.0


def _write_manifest(store: MetaDatasetStore, command: str, timings: dict, wall: float, ran: int, failed: int,
                    session_id: str, done: bool = False) -> dict:
    """Update manifest.json: this driver run's entry (replaced in place while it runs; `finished` once done) and
    the totals over every row recorded."""
    p = store.root / "manifest.json"
    man = json.loads(p.read_text()) if p.exists() else {"sessions": []}
    man["sessions"] = [x for x in man["sessions"] if x.get("session_id") != session_id]
    st = store.students().to_pylist()
    tasks = store.task_rows().to_pylist()
    counts: dict = {}
    for r in st:
        c = counts.setdefault(r["task_id"], {"ok": 0, "failed": 0, "replicates": 0})
        if r["replicate"]:
            c["replicates"] += 1
        else:
            c["ok" if r["status"] == "ok" else "failed"] += 1
    man["sessions"].append({"session_id": session_id, "finished": done, "command": command,
                            "code_version": code_version(), "machine": machine(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - wall)),
                            "wall_s": round(wall, 1), "runs": ran, "failed": failed,
                            **{k: round(v, 1) for k, v in timings.items()}})
    man["total_wall_s"] = round(sum(s["wall_s"] for s in man["sessions"]), 1)
    man["kd_cpu_s"] = round(sum(r["wall_s"] for r in st), 1)
    man["teacher_wall_s"] = round(sum(t["train_wall_s"] for t in tasks), 1)
    man["tasks"] = {t["task_id"]: {"role": t["role"], "source": t["source"], "teacher_acc": round(t["teacher_acc"], 4),
                                   **counts.get(t["task_id"], {})} for t in tasks}
    man["students"] = len(st)
    atomic_write_text(p, json.dumps(man, indent=1))
    return man
