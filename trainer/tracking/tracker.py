"""MLflow tracking and progress lines, as one transformers callback.

Only global rank 0 talks to MLflow. Without a tracking URI in the recipe or
$MLFLOW_TRACKING_URI, MLflow's own default store in the working directory is used (no server
needed; `mlflow ui` there shows every run). The run id is kept in the run directory so a
resumed run continues the same MLflow run.

Every record is appended to RUN_DIR/metrics.jsonl before it is sent. When the tracking server
cannot be reached (at start or mid-run), training goes on with a warning, the tracker retries
every RETRY_S seconds and once more at the end, and `keel sync RUN_DIR` sends whatever is
still missing (trainer/tracking/local.py). Node 0's system metrics go through the tracker
and are kept the same way; other nodes' samples are lost while the server is away.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from data.redaction import redact_text
from trainer.models.flops import device_peak_flops
from trainer.tracking.local import (MAX_PARAM_BATCH, METRICS_FILE, PENDING_DIR, RUN_ID_FILE, append_record,
                                  bound_mlflow_retries, metric_records, register_export, save_pending, sync_run,
                                  tracking_reachable, use_tracking_uri)

RETRY_S = 10.0  # while the tracking server is unreachable: a 2 s connection probe this often


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunTracker(TrainerCallback):
    """Logs the resolved recipe, format and metrics to MLflow; prints progress lines."""

    def __init__(self, *, mlflow_section, params: dict, artifacts: dict[str, str], run_dir: Path,
                 is_main: bool, log_every: int, resume_step: int = 0, tags: dict[str, str] | None = None,
                 flops_per_token: int = 0, world: int = 1):
        self.cfg = mlflow_section
        self.params = params
        self.tags = tags or {}
        # for the MFU estimate on GPUs: trainer/models/flops.py, as keel plan counts it (0: no MFU)
        self.flops_per_token, self.world = flops_per_token, world
        self.artifacts = artifacts  # artifact path -> text
        self.run_dir = run_dir
        self.is_main = is_main
        self.log_every = log_every
        self.run_id: str | None = None
        self.resume_step = resume_step
        self.history: list[tuple[int, float]] = []
        self._t_start = self._t_last = 0.0
        self._tokens_last = self._trained_last = 0.0
        self._metrics_file = run_dir / METRICS_FILE
        self._start_step = 0
        self.uri = ""
        self.offline = False  # the server did not answer: records wait in metrics.jsonl
        self._last_try = 0.0
        self._step = resume_step  # the training step now: system metrics sampled between logs carry it
        self._lock = threading.RLock()  # the system-metrics sampler records from its own thread

    # -- MLflow run lifecycle -------------------------------------------------

    def start(self) -> None:
        if not self.is_main:
            return
        self._keep_local_metrics_up_to(self.resume_step)
        import mlflow

        bound_mlflow_retries()
        use_tracking_uri(self.cfg.tracking_uri)
        self.uri = mlflow.get_tracking_uri()
        try:
            if not tracking_reachable(self.uri):
                raise ConnectionError("no connection")
            self._start_run()
        except Exception as exc:  # a tracking failure never stops training
            self._go_offline(exc)
            if not (self.run_dir / RUN_ID_FILE).is_file():
                items = {k: "" if v is None else str(v)[:6000] for k, v in self.params.items()}
                save_pending(self.run_dir, params=items, tags=self.tags, artifacts=self.artifacts)

    def _start_run(self) -> None:
        import mlflow

        mlflow.set_experiment(self.cfg.experiment)
        id_file = self.run_dir / RUN_ID_FILE
        previous = id_file.read_text().strip() if id_file.is_file() else None
        run = mlflow.start_run(run_id=previous, run_name=None if previous else self.cfg.run_name)
        self.run_id = run.info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(self.run_id + "\n")
        if previous is None:
            items = [(k, "" if v is None else str(v)[:6000]) for k, v in self.params.items()]
            for i in range(0, len(items), MAX_PARAM_BATCH):
                mlflow.log_params(dict(items[i:i + MAX_PARAM_BATCH]))
        for path, text in self.artifacts.items():
            mlflow.log_text(text, path)
        if self.tags:
            mlflow.set_tags(self.tags)
        print(f"[keel] MLflow run {self.run_id} in experiment {self.cfg.experiment!r} at "
              f"{redact_text(mlflow.get_tracking_uri())}",
              flush=True)

    def _go_offline(self, exc: BaseException) -> None:
        self._last_try = time.time()
        if not self.offline:
            self.offline = True
            print(f"[keel] warning: MLflow at {redact_text(self.uri)} is unreachable ({type(exc).__name__}: "
                  f"{redact_text(str(exc))[:300]}); training goes on, metrics are kept in {self._metrics_file} and "
                  f"sent when the server is back (or by `keel sync {self.run_dir}`)", file=sys.stderr, flush=True)

    def _catch_up(self) -> bool:
        """Send what the server missed; True when it is back and up to date."""
        import mlflow

        self._last_try = time.time()
        if not tracking_reachable(self.uri):
            return False
        try:
            run_id, sent, registered = sync_run(self.run_dir, experiment=self.cfg.experiment,
                                                run_name=self.cfg.run_name)
            if mlflow.active_run() is None:
                mlflow.start_run(run_id=run_id)
        except Exception:
            return False
        self.run_id, self.offline = run_id, False
        print(f"[keel] MLflow at {redact_text(self.uri)} is back: sent {sent} metric points kept while it was away"
              + (f"; registered the export as {registered}" if registered else ""), flush=True)
        return True

    def _log(self, metrics: dict[str, float], step: int) -> None:
        """Keep the record locally, then send it (or retry sending what is pending)."""
        with self._lock:
            now = time.time()
            append_record(self.run_dir, {"step": step, "timestamp": int(now * 1000), **metrics})
            if self.offline:
                if now - self._last_try >= RETRY_S:
                    self._catch_up()
                return
            if self.run_id:
                import mlflow

                try:
                    mlflow.log_metrics(metrics, step=step)
                except Exception as exc:
                    self._go_offline(exc)

    def log_system(self, metrics: dict[str, float]) -> None:
        """A system-metrics sample (from NodeSystemMetrics' thread), at the current training step:
        kept in the local record like every metric, sent now if the server is there, and
        otherwise by the next catch-up or `keel sync`."""
        with self._lock:
            now = int(time.time() * 1000)
            append_record(self.run_dir, {"step": self._step, "timestamp": now, **metrics})
            if self.offline or not self.run_id:
                return
            from mlflow.entities import Metric
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient().log_batch(self.run_id, metrics=[Metric(k, v, now, self._step)
                                                               for k, v in metrics.items()])
            except Exception as exc:
                self._go_offline(exc)

    def on_step_end(self, args, state, control, **kwargs):
        self._step = state.global_step

    def _keep_local_metrics_up_to(self, step: int) -> None:
        """On resume, steps after the checkpoint are trained again: drop their old records."""
        import json

        if not self._metrics_file.is_file():
            return
        kept = [rec for _, rec in metric_records(self._metrics_file)
                if isinstance(rec.get("step", 0), int) and rec.get("step", 0) <= step]
        self._metrics_file.write_text("".join(json.dumps(rec) + "\n" for rec in kept))
        self.history = [(r["step"], r["loss"]) for r in kept if "loss" in r]

    def register_model(self, model_location: str, name: str | None, *, upload: bool = False) -> None:
        """Register the export in MLflow's model registry (see metrics_sync.register_export).
        With the server away, the entry is kept in the run dir and made by the catch-up at
        the end of the run or by `keel sync RUN_DIR`."""
        if not (self.is_main and name):
            return
        if not self.offline and self.run_id:
            from mlflow.tracking import MlflowClient

            try:
                registered = register_export(MlflowClient(), self.run_id, name, model_location, upload=upload)
                print(f"[keel] registered {model_location} as {registered}", flush=True)
                return
            except Exception as exc:  # noqa: BLE001 - any failure of the server's: keep it for a later sync
                self._go_offline(exc)
        save_pending(self.run_dir, registration={"name": name, "model_location": model_location, "upload": upload})
        print(f"[keel] warning: not registered as {name!r} yet: MLflow at {redact_text(self.uri)} is unreachable; "
              f"kept in {self.run_dir / PENDING_DIR}, registered when the server is back (or by "
              f"`keel sync {self.run_dir}`)", file=sys.stderr, flush=True)

    def log_stats(self, prefix: str, stats: dict) -> None:
        """Data statistics at step 0, once per run (a resumed run has them already)."""
        if self.is_main and self.resume_step == 0:
            self._log({f"{prefix}.{k}": float(v) for k, v in stats.items()}, step=0)

    def log_files(self, directory: str, files: list[Path]) -> None:
        """Upload local files as artifacts under `directory`, keeping their names."""
        if not self.is_main:
            return
        if self.run_id and not self.offline:
            import mlflow

            try:
                for local in files:
                    mlflow.log_artifact(str(local), artifact_path=directory)
                return
            except Exception as exc:
                self._go_offline(exc)
        save_pending(self.run_dir, files=(directory, files))

    def finish(self, status: str = "FINISHED", tags: dict | None = None) -> None:
        if not self.is_main:
            return
        if self.offline and not self._catch_up():
            print(f"[keel] warning: MLflow at {redact_text(self.uri)} is still unreachable: the run's metrics are in "
                  f"{self._metrics_file}; send them with `keel sync {self.run_dir}` when it is back",
                  file=sys.stderr, flush=True)
            return
        if not self.run_id:
            return
        import mlflow

        try:
            if tags:
                mlflow.set_tags(tags)
            if self.history:
                mlflow.log_figure(self._loss_figure(), "loss_curve.png")
            mlflow.end_run(status=status)
        except Exception as exc:
            self._go_offline(exc)

    def _loss_figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps, losses = zip(*self.history)
        ax.plot(steps, losses)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return fig

    # -- trainer callbacks ----------------------------------------------------

    def on_train_begin(self, args, state, control, **kwargs):
        self._t_start = self._t_last = time.time()
        self._tokens_last = self._trained_last = 0.0
        self._start_step = state.global_step  # after a resume, the rate counts from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        now = time.time()
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        dt = max(now - self._t_last, 1e-9)
        if "num_tokens" in metrics:
            metrics["tokens_per_s"] = (metrics["num_tokens"] - self._tokens_last) / dt
            self._tokens_last = metrics["num_tokens"]
        if "num_trained_tokens" in metrics:  # tokens with a loss: what the run actually learns from
            metrics["trained_tokens_per_s"] = (metrics["num_trained_tokens"] - self._trained_last) / dt
            self._trained_last = metrics["num_trained_tokens"]
        metrics.update(_memory_metrics())
        if self.flops_per_token and "tokens_per_s" in metrics:
            import torch

            if torch.cuda.is_available():
                value = mfu(metrics["tokens_per_s"], flops_per_token=self.flops_per_token, world=self.world,
                            device_name=torch.cuda.get_device_name())
                if value is not None:
                    metrics["mfu"] = value
        self._t_last = now
        if "loss" in metrics:
            self.history.append((state.global_step, metrics["loss"]))
        self._log(metrics, state.global_step)
        if "loss" in metrics and (state.global_step % self.log_every == 0 or state.global_step == state.max_steps):
            done = state.global_step - self._start_step
            elapsed = now - self._t_start
            eta = elapsed / done * (state.max_steps - state.global_step) if done > 0 else float("nan")
            print(
                f"[keel] step {state.global_step}/{state.max_steps} loss {metrics['loss']:.4f} "
                f"lr {metrics.get('learning_rate', 0):.2e} grad_norm {metrics.get('grad_norm', float('nan')):.3f} "
                f"tokens/s {metrics.get('tokens_per_s', float('nan')):.0f} "
                f"elapsed {_fmt_duration(elapsed)} eta {_fmt_duration(eta) if math.isfinite(eta) else '?'}",
                flush=True,
            )



def mfu(tokens_per_s: float, *, flops_per_token: float, world: int, device_name: str) -> float | None:
    """Model FLOPs utilisation: the training FLOPs of every trained-through token
    (trainer/models/flops.py: 6 per trained, 4 per frozen active parameter; attention not counted,
    as in the PaLM paper's appendix B) over the devices' dense bf16 peak. `tokens_per_s` counts
    every rank's tokens. None for a device without a known peak."""
    peak = device_peak_flops(device_name)
    if peak is None or world < 1:
        return None
    return flops_per_token * tokens_per_s / (world * peak)


def _memory_metrics() -> dict[str, float]:
    """This process's memory: resident set size, and on a GPU the peak allocated by torch."""
    import psutil
    import torch

    out = {"memory_rss_gib": psutil.Process().memory_info().rss / 2**30}
    if torch.cuda.is_available():
        out["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class NodeSystemMetrics:
    """System metrics (CPU, memory, disk, network, GPU when present) from one process per node,
    logged to the run as system/node_<N>/<metric>, sampled by MLflow's own monitors.

    Node 0's first process is rank 0, which owns the run: its samples go through the tracker
    (`sink`), so they are kept in the run's local record like every metric and reach the
    server after an outage. (MLflow's monitor thread, which sends directly, stops for good at
    the first request that fails.) Rank 0's id and tracking URI reach the first process of every
    other node through the process group; those nodes use MLflow's monitor, and log only to a
    tracking server they can reach (an http(s) URI): a local store on node 0's disk is not theirs
    to write, and their samples while the server is away are lost.
    """

    def __init__(self, run_id: str | None, tracking_uri: str | None, *, node: int, every_s: float,
                 sink=None):
        self.monitor = self._thread = None
        if every_s <= 0:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        if sink is not None:
            from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
            from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
            from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

            # MLflow's monitors (its metric names; GPU when present), sampled here: nothing of the
            # tracking store is touched, so a store that is away or refused costs no sample
            self._monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
            gpu = SystemMetricsMonitor._initialize_gpu_monitor(None)
            if gpu is not None:
                self._monitors.append(gpu)
            self._prefix, self._sink, self._every_s = f"system/node_{node}/", sink, every_s
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, name="keel-system-metrics", daemon=True)
            self._thread.start()
            return
        if not run_id or (node > 0 and not str(tracking_uri).startswith(("http://", "https://"))):
            return
        self.monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, node_id=f"node_{node}",
                                            resume_logging=True, tracking_uri=tracking_uri)
        self.monitor.start()

    def _sample(self) -> None:
        while True:
            for monitor in self._monitors:
                monitor.collect_metrics()
            if self._stop.wait(self._every_s):
                return
            metrics = {}
            for monitor in self._monitors:
                metrics.update({self._prefix + k: float(v) for k, v in monitor.aggregate_metrics().items()})
                monitor.clear_metrics()
            try:
                self._sink(metrics)
            except Exception as exc:  # noqa: BLE001 - a metrics sample never stops training
                print(f"[keel] warning: system metrics stopped: {type(exc).__name__}: {exc}", file=sys.stderr,
                      flush=True)
                return

    def finish(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if self.monitor is not None:
            self.monitor.finish()
            self.monitor = None


def share_run(run_id: str | None, tracking_uri: str | None, world: int) -> tuple[str | None, str]:
    """Rank 0's MLflow run id, on every rank (a collective: all ranks call it), and the tracking
    URI this process logs to."""
    import mlflow

    use_tracking_uri(tracking_uri)
    shared = [run_id]
    if world > 1:
        import torch.distributed as dist

        dist.broadcast_object_list(shared, src=0)
    return shared[0], mlflow.get_tracking_uri()
