"""MLflow tracking and progress lines, as one transformers callback.

Only global rank 0 talks to MLflow. Without a tracking URI in the recipe or
$MLFLOW_TRACKING_URI, MLflow's own default store in the working directory is used (no server
needed; `mlflow ui` there shows every run). The run id is kept in the run directory so a
resumed run continues the same MLflow run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import TrainerCallback

RUN_ID_FILE = "mlflow_run_id"
METRICS_FILE = "metrics.jsonl"  # the same metrics, kept locally by rank 0 (one JSON object per step)
MAX_PARAM_BATCH = 100  # MLflow accepts at most 100 params per call


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RunTracker(TrainerCallback):
    """Logs the resolved recipe, format and metrics to MLflow; prints progress lines."""

    def __init__(self, *, mlflow_section, params: dict, artifacts: dict[str, str], run_dir: Path,
                 is_main: bool, log_every: int, resume_step: int = 0):
        self.cfg = mlflow_section
        self.params = params
        self.artifacts = artifacts  # artifact path -> text
        self.run_dir = run_dir
        self.is_main = is_main
        self.log_every = log_every
        self.run_id: str | None = None
        self.resume_step = resume_step
        self.history: list[tuple[int, float]] = []
        self._t_start = self._t_last = 0.0
        self._tokens_last = 0.0
        self._metrics_file = run_dir / METRICS_FILE
        self._start_step = 0

    # -- MLflow run lifecycle -------------------------------------------------

    def start(self) -> None:
        if not self.is_main:
            return
        self._keep_local_metrics_up_to(self.resume_step)
        import mlflow

        if self.cfg.tracking_uri:
            mlflow.set_tracking_uri(self.cfg.tracking_uri)
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
        print(f"[keel] MLflow run {self.run_id} in experiment {self.cfg.experiment!r} at {mlflow.get_tracking_uri()}",
              flush=True)

    def _keep_local_metrics_up_to(self, step: int) -> None:
        """On resume, steps after the checkpoint are trained again: drop their old records."""
        import json

        if not self._metrics_file.is_file():
            return
        kept = [line for line in self._metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        self._metrics_file.write_text("".join(line + "\n" for line in kept))
        self.history = [(r["step"], r["loss"]) for r in map(json.loads, kept) if "loss" in r]

    def register_model(self, model_dir: Path, name: str | None) -> None:
        """Register the export in MLflow's model registry, by reference to where it lives."""
        if not (self.is_main and self.run_id and name):
            return
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        version = client.create_model_version(name, source=str(Path(model_dir).resolve()), run_id=self.run_id)
        print(f"[keel] registered {model_dir} as models:/{name}/{version.version}", flush=True)

    def log_stats(self, prefix: str, stats: dict) -> None:
        if self.is_main and self.run_id:
            import mlflow

            mlflow.log_metrics({f"{prefix}.{k}": float(v) for k, v in stats.items()}, step=0)

    def log_files(self, directory: str, files: list[Path]) -> None:
        """Upload local files as artifacts under `directory`, keeping their names."""
        if self.is_main and self.run_id:
            import mlflow

            for local in files:
                mlflow.log_artifact(str(local), artifact_path=directory)

    def finish(self, status: str = "FINISHED", tags: dict | None = None) -> None:
        if not (self.is_main and self.run_id):
            return
        import mlflow

        if tags:
            mlflow.set_tags(tags)
        if self.history:
            mlflow.log_figure(self._loss_figure(), "loss_curve.png")
        mlflow.end_run(status=status)

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
        self._tokens_last = 0.0
        self._start_step = state.global_step  # after a resume, the rate counts from here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.is_main or not logs:
            return
        now = time.time()
        metrics = {k: float(v) for k, v in logs.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if "num_tokens" in metrics:
            dt = max(now - self._t_last, 1e-9)
            metrics["tokens_per_s"] = (metrics["num_tokens"] - self._tokens_last) / dt
            self._tokens_last = metrics["num_tokens"]
        self._t_last = now
        if "loss" in metrics:
            self.history.append((state.global_step, metrics["loss"]))
        if "loss" in metrics or "eval_loss" in metrics:
            import json

            with self._metrics_file.open("a") as f:
                f.write(json.dumps({"step": state.global_step, **metrics}) + "\n")
        if self.run_id:
            import mlflow

            mlflow.log_metrics(metrics, step=state.global_step)
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

