"""The search on Ray: encoder actors -> predictor replicas -> a score-driven Tune searcher -> KD trials.

Stages (each logged to `<output>/events.jsonl` with gapless sequence numbers, and resumable with `resume=True`):
validate -> [teacher] -> embed/score (candidates.parquet) -> kd (trials.parquet) -> export -> done | failed.
Validation happens before any Ray work (`dass_ray.search.inputs`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dass_ray.core.embed import Embedder
from dass_ray.core.export import export_all, spec_for
from dass_ray.core.kd import TeacherCheckpoint, compute_soft_labels, load_teacher, round_half, train_teacher
from dass_ray.core.nets import build
from dass_ray.core.predictor import PredictorBatch
from dass_ray.core.posterior import PoolModel, load_prior
from dass_ray.core.ranking import order_key
from dass_ray.core.space import ArchConfig
from dass_ray.search.inputs import Prepared, teacher_warnings
from dass_ray.search.rayutil import Progress, tune_verbosity
from dass_ray.search.report import write_report
from dass_ray.search.resources import max_cluster_cpus
from dass_ray.search.scoring import score_candidates
from dass_ray.search.searcher import STOP_MARGIN, DaSSSearcher, PosteriorSearcher, stop_message
from dass_ray.search.trainable import _bundle, _checkpoint_uri, _TrialRecorder, kd_trainable
from dass_ray import contract as C

# ----------------------------------------------------------------------------------------------------------------
# Events and state
# ----------------------------------------------------------------------------------------------------------------


class EventLog:
    """Append-only JSON lines with gapless sequence numbers (continues across resumes)."""

    def __init__(self, path: Path):
        self.path = path
        self.seq = 0
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    self.seq = int(json.loads(line)["seq"]) + 1
                except (ValueError, KeyError):
                    break  # a torn last line from a kill: overwrite from here
            self._truncate_to_seq()

    def _truncate_to_seq(self) -> None:
        lines = self.path.read_text().splitlines()[: self.seq]
        self.path.write_text("".join(line + "\n" for line in lines))

    def emit(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        if stage not in C.STAGES:
            raise ValueError(f"unknown stage {stage!r}; the contract's stages: {', '.join(C.STAGES)}")
        ev = {"seq": self.seq, "time": time.time(), "stage": stage, "done": int(done), "total": int(total),
              "message": message}
        with open(self.path, "a") as f:
            f.write(json.dumps(ev) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.seq += 1


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


class SearchRun:
    def __init__(self, prep: Prepared):
        self.p = prep
        self.cfg = prep.cfg
        self.out = prep.out
        self.out.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.out / "events.jsonl")
        self.state_path = self.out / "state.json"
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {"timings": {}}
        self.trial_rows: list[dict] = []
        self.warnings: list[str] = []
        tp = self.out / "trials.parquet"
        if tp.exists():
            self.trial_rows = pq.read_table(tp).to_pylist()
        self.prior = load_prior()  # the posterior's prior (dass_ray.core.posterior), fit with the shipped predictor
        self.post: PoolModel | None = None  # the posterior given the trials recorded so far (during KD)
        self.cands: pa.Table | None = None

    def _save_state(self) -> None:
        tmp = self.state_path.with_name("state.json.tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        os.replace(tmp, self.state_path)

    def run(self) -> C.SearchResult:
        cfg, p = self.cfg, self.p
        try:
            self.events.emit("validate", 1, 1, f"dataset {cfg.dataset}: {p.data.num_classes} classes, "
                             f"{len(p.data.y_train)} train / {len(p.data.y_val)} val images")
            teacher = self._teacher()
            self.teacher = teacher
            foreign_acc = self.state.get("foreign_teacher_acc") if p.foreign is not None else None
            self.warnings = teacher_warnings(teacher.val_acc, p.data.num_classes, p.predictor_meta, foreign_acc)
            for w in self.warnings:
                print(f"warning: {w}", file=sys.stderr, flush=True)
                self.events.emit("validate", 1, 1, f"warning: {w}")
            scored = self._score(teacher)
            trials = self._kd(teacher, scored)
            result = self._export(teacher, scored, trials)
            if self.cfg.history:
                self._record_history(teacher, trials)
            self.events.emit("done", 1, 1, f"best student {result.best.measured_acc:.4f} "
                             f"(teacher {result.teacher_acc:.4f})")
            return result
        except Exception as e:
            self.events.emit("failed", 0, 0, f"{type(e).__name__}: {e}")
            raise

    # stages ---------------------------------------------------------------------------------------------------

    def _teacher(self) -> TeacherCheckpoint:
        p = self.p
        if p.teacher is not None:
            return p.teacher
        if p.foreign is not None:
            return self._proxy_teacher()
        path = self.out / "teacher.pt"
        if path.exists():
            return load_teacher(path)
        t0 = time.time()
        total = p.scale.teacher.epochs
        self.events.emit("teacher", 0, total, "training a teacher on the dataset")
        ev = self.events

        class Rep:
            def report(self, m, state):
                ev.emit("teacher", m["epoch"], total, f"val acc {m['val_acc']:.4f}")

        model, res = train_teacher(p.space, p.data, p.scale.teacher, seed=self.cfg.seed, reporter=Rep())
        model.load_state_dict(round_half(model.state_dict()))
        from dass_ray.core.kd import evaluate, save_teacher

        acc = evaluate(model, p.data.x_val, p.data.y_val)
        save_teacher(path, model, p.space, acc, p.data.class_names, half=True,
                     meta={"trained_by": "search", "history": res.history})
        self.state["timings"]["teacher"] = round(time.time() - t0, 2)
        self._save_state()
        return load_teacher(path)

    # a foreign teacher (docs/teachers.md) ---------------------------------------------------------------------

    def _soft_labels(self, teacher: TeacherCheckpoint):
        """What the KD trials distil: a foreign teacher's own soft labels (cached, sharded), else the teacher's."""
        if self.p.foreign is not None:
            return self._foreign_soft()
        return compute_soft_labels(teacher.model(), self.p.data.x_train, views=2 if self.p.scale.kd.flip else 1)

    def _foreign_soft(self):
        """The foreign teacher's soft labels, computed once by sharded Ray actors and cached by content digest."""
        if getattr(self, "_fsoft", None) is None:
            from dass_ray.search.softlabels import cache_dir, foreign_soft_labels

            f, views = self.p.foreign, 2 if self.p.scale.kd.flip else 1
            t0 = time.time()
            self.events.emit("teacher", 0, 1, f"soft labels of the {f.teacher.describe()}: {len(f.x_train)} images x "
                             f"{views} view(s) on {self.cfg.encoders} actor(s)")
            soft, cached = foreign_soft_labels(f, views, cache_dir(self.cfg.cache, self.out),
                                               num_actors=self.cfg.encoders)
            self.events.emit("teacher", 1, 1, "soft labels " + ("read from the cache" if cached else
                                                                f"computed in {time.time() - t0:.1f} s"))
            self._fsoft = soft
        return self._fsoft

    def _proxy_teacher(self) -> TeacherCheckpoint:
        """A foreign teacher's proxy: the family's largest member distilled from it on the user's data (Ray Train,
        resumable, cached by digest); it ranks the candidates and initialises the students (`dass_ray.search.proxy`)."""
        import shutil

        from dass_ray.core.kd import evaluate, save_teacher
        from dass_ray.search.proxy import proxy_digest, train_proxy_on_ray
        from dass_ray.search.softlabels import cache_dir

        p, f = self.p, self.p.foreign
        if "foreign_teacher_acc" not in self.state:
            self.state["foreign_teacher_acc"] = f.val_accuracy()
            self._save_state()
        soft = self._foreign_soft()
        digest = proxy_digest(soft.meta.get("digest", ""), p.data, p.space, p.scale, self.cfg.seed)
        cached = cache_dir(self.cfg.cache, self.out) / f"proxy-{digest}.pt"
        path = self.out / "proxy_teacher.pt"
        t0, fresh = time.time(), not cached.is_file()
        if fresh:
            total = p.scale.teacher.epochs
            self.events.emit("teacher", 0, total, f"distilling the foreign teacher (val acc "
                             f"{self.state['foreign_teacher_acc']:.4f}) into the family's largest member, the proxy "
                             f"that ranks the candidates")
            sd, info = train_proxy_on_ray(p.space, p.data, soft, p.scale, storage=self.cfg.storage,
                                          name=f"proxy-{digest}", seed=self.cfg.seed)
            model = build(p.space.teacher(), p.space)
            model.load_state_dict(sd)
            acc = evaluate(model, p.data.x_val, p.data.y_val)
            save_teacher(cached, model, p.space, acc, p.data.class_names,
                         meta={"trained_by": "search", "proxy_of": f.teacher.kind, "foreign": f.teacher.describe(),
                               "foreign_digest": f.teacher.digest(), "history": info["result"].get("history", []),
                               "resumed_from": info["resumed_from"]})
            self.state["timings"]["teacher"] = round(time.time() - t0, 2)
        if not path.is_file():
            shutil.copyfile(cached, path)
        proxy = load_teacher(path)
        self.events.emit("teacher", p.scale.teacher.epochs, p.scale.teacher.epochs,
                         f"teacher ({f.teacher.kind}) val acc {self.state['foreign_teacher_acc']:.4f}; proxy teacher "
                         f"val acc {proxy.val_acc:.4f}" + ("" if fresh else " (from the cache)"))
        self._save_state()
        return proxy

    def _teacher_fields(self, teacher: TeacherCheckpoint) -> dict:
        """result.json's teacher fields: for a foreign teacher its own accuracy and the proxy's."""
        p = self.p
        if p.foreign is not None:
            return {"teacher_acc": float(self.state["foreign_teacher_acc"]), "teacher_kind": p.foreign.teacher.kind,
                    "proxy_teacher_acc": float(teacher.val_acc)}
        return {"teacher_acc": teacher.val_acc, "teacher_kind": "family" if p.teacher is not None else "trained"}

    def _score(self, teacher: TeacherCheckpoint) -> pa.Table:
        cfg, p = self.cfg, self.p
        cp = self.out / "candidates.parquet"
        if cp.exists() and self.state.get("scored"):
            self.events.emit("score", cfg.candidates, cfg.candidates, "resumed: candidates already scored")
            return pq.read_table(cp)
        t0 = time.time()
        rng = np.random.default_rng(cfg.seed)
        archs = p.deploy_space.sample_many(rng, cfg.candidates, max_flops=cfg.max_flops or None,
                                           max_params=cfg.max_params or None)
        n = len(archs)
        self.events.emit("embed", 0, n, f"embedding {n} candidates on {cfg.encoders} encoder actor(s), scoring "
                         f"on {cfg.predictors} predictor replica(s)")
        prog = Progress(n, "score")
        done = [0]
        step = max(1, n // 20)

        def on_progress(k):
            done[0] += k
            prog.update(k)
            if done[0] % step < k or done[0] == n:
                self.events.emit("score", done[0], n, "")

        scores = score_candidates(teacher.state_dict, p.space, archs, p.predictor, teacher.val_acc,
                                  encoders=cfg.encoders, predictors=cfg.predictors, batch_size=cfg.batch_size,
                                  on_progress=on_progress)
        prog.close()
        self.state["timings"]["score"] = round(time.time() - t0, 3)  # sampling, embedding, scoring
        params = np.array([p.space.params(a) for a in archs], dtype=np.int64)
        flops = np.array([p.deploy_space.flops(a) for a in archs], dtype=np.int64)  # at the export size
        model = PoolModel(self.prior, scores, params, flops, teacher.val_acc, p.data.num_classes,
                           p.space.encode_many(archs))
        # the distillation order (cfg.order: by default the posterior, before any trial its mean; or the predictor's
        # ranking, blended with model size for a teacher well above chance); `rank` 0 is distilled first
        if (cfg.order or C.DEFAULT_ORDER) == "posterior":
            key = model.mean()
        else:
            key = order_key(cfg.order, scores, params, teacher.val_acc, p.data.num_classes)
        order = np.argsort(-key, kind="mergesort")
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        mean, lo, hi = model.predicted()
        table = pa.table({
            "index": np.arange(n, dtype=np.int64), "arch_json": [a.to_json() for a in archs],
            "arch_digest": [a.digest() for a in archs], "flops": flops, "params": params,
            # the predicted accuracy: the posterior mean given the trials measured so far (rewritten after each
            # trial) with its 90% interval; predictor_score is the meta-trained predictor's own output, the prior
            "predicted_acc": mean, "predicted_lo": lo, "predicted_hi": hi,
            "predictor_score": scores.astype(np.float64), "rank": rank,
        })
        tmp = cp.with_name(cp.name + ".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, cp)
        self.state["scored"] = True
        self._save_state()
        return table

    def record_trial(self, trial, error: bool = False) -> None:
        r = trial.last_result or {}
        conf = trial.config
        failed = error or r.get("status") == "failed" or r.get("best_acc") is None
        row = {"index": int(conf["index"]), "arch_json": conf["arch_json"], "predicted_acc": float(conf["predicted"]),
               "measured_acc": None if failed else float(r["best_acc"]),
               "final_acc": None if failed else float(r.get("val_acc", 0.0)), "epochs": int(r.get("epoch", 0) or 0),
               "status": "failed" if failed else "ok",
               "reason": str(r.get("reason") or (trial.error_file and "trial error") or ""),
               "time_s": float(r.get("time_total_s", 0.0) or 0.0), "trial_id": trial.trial_id,
               "checkpoint": self._portable(_checkpoint_uri(trial.checkpoint)),
               # the posterior's 90% interval when the trial was proposed (predicted_acc is its mean)
               "predicted_lo": float(conf.get("predicted_lo", float("nan"))),
               "predicted_hi": float(conf.get("predicted_hi", float("nan")))}
        if any(x["index"] == row["index"] for x in self.trial_rows):
            return
        self.trial_rows.append(row)
        self._update_posterior()
        tp = self.out / "trials.parquet"
        tmp = tp.with_name(tp.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(self.trial_rows), tmp)
        os.replace(tmp, tp)
        iv = (f" [90%: {row['predicted_lo']:.4f}, {row['predicted_hi']:.4f}]"
              if np.isfinite(row["predicted_lo"]) and np.isfinite(row["predicted_hi"]) else "")
        msg = (f"student #{row['index']}: predicted {row['predicted_acc']:.4f}{iv}, "
               + (f"measured {row['measured_acc']:.4f}" if row["status"] == "ok" else f"failed ({row['reason']})"))
        if self.cfg.stop_probability and self.post is not None and self.post.obs:
            tried = [int(r["index"]) for r in self.trial_rows]
            msg += (f"; P(an untried candidate beats the best by > {100 * STOP_MARGIN:g} points) = "
                    f"{self.post.prob_improvement(STOP_MARGIN, exclude=tried):.3f}")
        self.events.emit("kd", len(self.trial_rows), self.cfg.top_k, msg)

    def _portable(self, ck: str) -> str:
        """A checkpoint inside the output directory is recorded relative to it, so trials.parquet names no path of
        this machine and the directory can be moved; one elsewhere (shared storage, a URI) as it is."""
        if ck and "://" not in ck:
            out = str(self.out.resolve())
            if os.path.abspath(ck).startswith(out + os.sep):
                return os.path.relpath(os.path.abspath(ck), out)
        return ck

    def _pool_model(self, cands: pa.Table) -> PoolModel:
        """The posterior over the candidates' accuracies given the trials recorded so far: rebuilt from the files,
        so a resumed search has the same one."""
        archs = [ArchConfig.from_json(j) for j in cands["arch_json"].to_pylist()]
        col = "predictor_score" if "predictor_score" in cands.column_names else "predicted_acc"
        m = PoolModel(self.prior, cands[col].to_numpy(), cands["params"].to_numpy(), cands["flops"].to_numpy(),
                      self.teacher.val_acc, self.p.data.num_classes, self.p.space.encode_many(archs))
        for r in self.trial_rows:
            if r["status"] == "ok":
                m.observe(int(r["index"]), float(r["measured_acc"]))
        return m

    def _update_posterior(self) -> None:
        """After a trial: the posterior takes its measured accuracy; candidates.parquet's predicted accuracies and
        intervals are rewritten from it."""
        if self.post is None or self.cands is None:
            return
        r = self.trial_rows[-1]
        if r["status"] == "ok":
            self.post.observe(int(r["index"]), float(r["measured_acc"]))
        mean, lo, hi = self.post.predicted()
        t = self.cands
        for name, v in (("predicted_acc", mean), ("predicted_lo", lo), ("predicted_hi", hi)):
            if name in t.column_names:
                t = t.set_column(t.column_names.index(name), name, pa.array(v, pa.float64()))
        self.cands = t
        cp = self.out / "candidates.parquet"
        tmp = cp.with_name(cp.name + ".tmp")
        pq.write_table(t, tmp)
        os.replace(tmp, cp)

    def _stop_check(self) -> str:
        """Why the search ended before top_k trials under --stop-probability ("" when it did not)."""
        cfg = self.cfg
        if not cfg.stop_probability or self.post is None or len(self.trial_rows) >= cfg.top_k:
            return ""
        tried = [int(r["index"]) for r in self.trial_rows]
        p = self.post.prob_improvement(STOP_MARGIN, exclude=tried)
        return stop_message(p, cfg.stop_probability, STOP_MARGIN, len(self.post.obs)) if p < cfg.stop_probability else ""

    def _kd(self, teacher: TeacherCheckpoint, cands: pa.Table) -> list[dict]:
        from ray import tune
        from ray.tune import RunConfig, TuneConfig, Tuner

        cfg, p = self.cfg, self.p
        t0 = time.time()
        arch_jsons = cands["arch_json"].to_pylist()
        predicted = cands["predicted_acc"].to_numpy()
        ranked = list(np.argsort(cands["rank"].to_numpy(), kind="mergesort"))  # the order _score chose
        done = {r["index"]: r["measured_acc"] for r in self.trial_rows}
        remaining = cfg.top_k - len(done)
        if remaining <= 0:
            self.events.emit("kd", len(done), cfg.top_k, "resumed: all KD trials already finished")
            return self.trial_rows
        soft = self._soft_labels(teacher)
        ctx = {"space": p.space, "teacher_sd": teacher.state_dict, "data": p.kd_data, "kd": p.scale.kd,
               "seed": cfg.seed, "soft": soft, "threads": 1}
        self.cands, self.post = cands, self._pool_model(cands)
        order = cfg.order or C.DEFAULT_ORDER
        if cfg.readapt:
            searcher = DaSSSearcher(arch_jsons, predicted, ranked, cfg.top_k,
                                    rerank=self._reranker(teacher, arch_jsons), done=done)
        else:
            # the posterior proposes each next candidate from every trial measured so far ("posterior"), or follows
            # the fixed order _score chose; either way it keeps the intervals and the --stop-probability rule
            searcher = PosteriorSearcher(arch_jsons, self._pool_model(cands), cfg.top_k,
                                         ranked=None if order == "posterior" else ranked,
                                         stop_probability=cfg.stop_probability, seed=cfg.seed, done=done)
        cpus = max_cluster_cpus()  # what the cluster has or can autoscale to, so Tune's demand can grow it
        scheduler = None
        if cfg.asha:
            from ray.tune.schedulers import ASHAScheduler

            scheduler = ASHAScheduler(time_attr="epoch", max_t=p.scale.kd.epochs, grace_period=1, reduction_factor=2)
        how = "".join([", ASHA early stopping" if cfg.asha else "",
                       ", re-ranking the rest after each (re-adaptation)" if cfg.readapt else ""])
        self.events.emit("kd", len(done), cfg.top_k, f"distilling the top {cfg.top_k} in "
                         f"{cfg.order or C.DEFAULT_ORDER} order ({remaining} to run, {p.scale.kd.epochs} epochs "
                         f"each at {p.image_size}x{p.image_size} px{how})")
        from ray.tune import PlacementGroupFactory

        trainable = tune.with_resources(tune.with_parameters(kd_trainable, ctx=ctx),
                                        PlacementGroupFactory([_bundle("kd_trial")]))
        tuner = Tuner(
            trainable,
            tune_config=TuneConfig(search_alg=searcher, num_samples=remaining, metric="best_acc", mode="max",
                                   scheduler=scheduler, max_concurrent_trials=cfg.max_concurrent or max(1, cpus),
                                   # a finished trial's process (torch and this package already imported)
                                   # runs the next one: 4 sequential tiny trials 20 s -> 13 s, same results
                                   reuse_actors=True),
            run_config=RunConfig(name="kd", storage_path=cfg.storage,
                                 callbacks=[_TrialRecorder(self)], verbose=tune_verbosity(),
                                 failure_config=tune.FailureConfig(max_failures=2)),
        )
        tuner.fit()
        stop = self._stop_check()
        if stop:
            self.state["stop_reason"] = stop
            print(stop, file=sys.stderr, flush=True)
            self.events.emit("kd", len(self.trial_rows), cfg.top_k, stop)
        self.state["timings"]["kd"] = round(self.state["timings"].get("kd", 0) + time.time() - t0, 2)
        self.state["readapt"] = bool(cfg.readapt)
        self._save_state()
        return self.trial_rows

    def _reranker(self, teacher: TeacherCheckpoint, arch_jsons: list[str]):
        """Re-adapt on the teacher + measured students, then re-score the remaining top candidates."""
        # The closure travels inside the searcher, which Tune pickles: it holds only what it needs, not the run.
        space, predictor, top_k, teacher_acc = self.p.space, self.p.predictor, self.cfg.top_k, teacher.val_acc
        eng = Embedder(teacher.state_dict, space)
        tmap = eng.teacher_embedding().clone()
        tcode = torch.from_numpy(space.encode(space.teacher()).astype(np.float32))

        def rerank(measured: dict[int, float], remaining: list[int]) -> list[int]:
            head = remaining[: max(4 * top_k, 64)]
            idx = list(measured)
            archs = [ArchConfig.from_json(arch_jsons[i]) for i in idx]
            sup = PredictorBatch(torch.cat([tmap, eng.embed(archs).clone()]), tmap,
                                 torch.cat([tcode[None], torch.from_numpy(space.encode_many(archs))]),
                                 torch.tensor([teacher_acc] + [measured[i] for i in idx], dtype=torch.float32))
            qa = [ArchConfig.from_json(arch_jsons[i]) for i in head]
            q = PredictorBatch(eng.embed(qa), tmap, torch.from_numpy(space.encode_many(qa)))
            s = predictor.predict(sup, q).numpy()
            return [head[j] for j in np.argsort(-s, kind="mergesort")] + remaining[len(head):]

        return rerank

    def _record_history(self, teacher: TeacherCheckpoint, trials: list[dict]) -> None:
        from dass_ray.search import history

        cfg, p = self.cfg, self.p
        if "run_id" not in self.state:  # kept across resumes: the history gets this search's rows exactly once
            self.state["run_id"] = uuid.uuid4().hex[:16]
            self._save_state()
        n = history.record(cfg.history, self.state["run_id"], job_id=cfg.job_id or self.state["run_id"],
                           dataset_digest=history.dataset_digest(cfg.dataset, cfg.data_root),
                           source=Path(cfg.dataset).stem, classes=cfg.classes,
                           teacher=teacher, space=p.space, trials=trials, seed=cfg.seed,
                           image_size=p.image_size)
        self.events.emit("export", 1, 1, f"history: {n} measured students appended to {cfg.history}")

    def _export(self, teacher: TeacherCheckpoint, cands: pa.Table, trials: list[dict]) -> C.SearchResult:
        p, cfg = self.p, self.cfg
        t0 = time.time()
        ok = [r for r in trials if r["status"] == "ok"]
        if not ok:
            raise RuntimeError(f"all {len(trials)} KD trials failed: " + "; ".join(r["reason"] for r in trials[:3]))
        best = max(ok, key=lambda r: r["measured_acc"])
        self.events.emit("export", 0, 1, f"exporting student #{best['index']}")
        arch = ArchConfig.from_json(best["arch_json"])
        from ray.train import Checkpoint

        # Through the checkpoint's file system: the trial may have run on another node, its checkpoint on
        # shared or cloud storage.
        ck = best["checkpoint"]
        if ck and "://" not in ck and not os.path.isabs(ck):  # relative to the output directory (`_portable`)
            ck = str(self.out.resolve() / ck)
        with Checkpoint(ck).as_directory() as d:
            state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=False)
        sd = state.get("best_model") or state["model"]
        model = build(arch, p.space)
        model.load_state_dict(sd)
        model.eval()
        torch.save({"format": "dass_ray.student/1", "arch": arch.to_dict(), "space": p.space.to_dict(),
                    "state_dict": sd, "class_names": list(p.data.class_names)}, self.out / "student.pt")
        spec = spec_for(p.kd_data, p.image_size)
        exports, export_s = export_all(model, spec, self.out)  # TorchScript, ONNX, torch.export
        row = cands.slice(best["index"], 1).to_pylist()[0]
        self.state["timings"]["export"] = round(time.time() - t0, 3)
        req = {f.name: getattr(cfg, f.name) for f in C.REQUEST_FIELDS}
        result = C.SearchResult(
            best=C.StudentResult(arch=arch.to_dict(), arch_json=arch.to_json(), measured_acc=best["measured_acc"],
                                 predicted_acc=best["predicted_acc"], flops=int(row["flops"]),
                                 params=int(row["params"]), index=int(best["index"]),
                                 predicted_rank=int(row["rank"])),
            **self._teacher_fields(teacher), teacher_flops=int(p.deploy_space.flops(p.space.teacher())),
            teacher_params=int(p.space.params(p.space.teacher())), candidates=cands.num_rows, top_k=cfg.top_k,
            trials=[{k: r.get(k) for k in ("index", "predicted_acc", "predicted_lo", "predicted_hi", "measured_acc",
                                           "status")} for r in trials],
            request=C.SearchRequest(**req).to_dict(), input_spec=spec, class_names=list(p.data.class_names),
            timings_s={k: v for k, v in self.state["timings"].items() if k in C.TIMED_STAGES},
            warnings=list(self.warnings), stop_reason=self.state.get("stop_reason", ""), exports=exports)
        result.write(self.out / C.RESULT_FILE)
        write_report(self.out / "report.png", cands, trials, result, self.cfg.max_flops)
        files = ", ".join(f"{e['file']} ({export_s[e['format']]:.1f} s)" for e in exports)
        self.events.emit("export", 1, 1, f"wrote student.pt, {files}, result.json, report.png")
        self._save_state()
        return result
