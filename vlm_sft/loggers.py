"""Logger backends, RLinf's `runner.logger.logger_backends`: TensorBoard, Weights & Biases, SwanLab.

Each backend takes every scalar the trainer writes (MetricsWriter fans out to them; metrics.jsonl is written
beside them, always). `runner.logger.project_name` / `experiment_name` are the backend's project and run name, and
the resolved config is the run's config. wandb and swanlab are optional extras, checked with the run's other
checks (main.run_checks), so a missing one fails before any data or weights are read, with the pip command.

Offline: each library's own switch, `WANDB_MODE=offline` (files under `<run dir>/wandb/`, `wandb sync` later) and
`SWANLAB_MODE=offline` or `local` (under `<run dir>/swanlog/`). The backend run ids are kept in
`<run dir>/logger_ids.json`, so a run resumed from a checkpoint continues the same backend run instead of
starting a new one.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import threading
from typing import Any, Mapping, Protocol

from vlm_sft.errors import ConfigError
from vlm_sft.faults import STOP_SIGNALS

BACKENDS = ("tensorboard", "wandb", "swanlab")
# backend -> (module to import, pip command): the extras of pyproject.toml.
EXTRAS = {
    "tensorboard": ("tensorboardX", "pip install tensorboardX"),
    "wandb": ("wandb", "pip install -e '.[wandb]'"),
    "swanlab": ("swanlab", "pip install -e '.[swanlab]'"),
}
IDS_FILE = "logger_ids.json"
FIELD = "runner.logger.logger_backends"


class Backend(Protocol):
    """Where scalars go: `log` one step's {name: float}; `close` flushes and ends the backend's run (marked failed
    where the backend has the notion, when the training run ended on an error)."""

    name: str

    def log(self, step: int, scalars: Mapping[str, float]) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def check_backends(names: Any) -> tuple[str, ...]:
    """The backend names, checked: known, none twice, each one's package importable (else the pip command)."""
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
        raise ConfigError(f"{FIELD}={names!r}: expected a tuple of names, e.g. '(\"tensorboard\",\"wandb\")'")
    names = tuple(names)
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"{FIELD}: unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{FIELD}={list(names)}: a backend is named twice")
    for name in names:
        module, command = EXTRAS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"{FIELD}: {name!r} needs the {module} package, which does not import ({e}): "
                              f"{command}") from None
    return names


class TensorBoard:
    """Event files under `<run dir>/tensorboard/` (`tensorboard --logdir <run dir>`)."""

    name = "tensorboard"

    def __init__(self, run_dir: str):
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(logdir=os.path.join(run_dir, "tensorboard"))

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        self._writer.close()


class Wandb:
    """A Weights & Biases run under `<run dir>/wandb/`; resumed by id (resume="allow")."""

    name = "wandb"

    def __init__(self, run_dir: str, *, project: str, experiment: str, run_config: dict, run_id: str | None):
        import wandb

        # create_new: a second run in one process (tests, notebooks) never finishes another run's logging.
        self._run = wandb.init(project=project, name=experiment, id=run_id, resume="allow", dir=run_dir,
                               config=run_config, reinit="create_new")
        self.run_id = self._run.id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self, failed: bool = False) -> None:
        self._run.finish(exit_code=1 if failed else 0)


class SwanLab:
    """A SwanLab experiment under `<run dir>/swanlog/`; resumed by id (resume="allow")."""

    name = "swanlab"

    def __init__(self, run_dir: str, *, project: str, experiment: str, run_config: dict, run_id: str | None):
        import swanlab

        self._run = swanlab.init(project=project, experiment_name=experiment, id=run_id, resume="allow",
                                 log_dir=os.path.join(run_dir, "swanlog"), config=run_config)
        self.run_id = self._run.id

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        self._run.log(dict(scalars), step=step)

    def close(self, failed: bool = False) -> None:
        if failed:
            self._run.finish(state="crashed", error="the training run stopped on an error (see its log)")
        else:
            self._run.finish()


def read_ids(run_dir: str) -> dict[str, str]:
    """Backend run ids of earlier runs in this run dir ({} for a new run dir)."""
    path = os.path.join(run_dir, IDS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            ids = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); delete it to start new backend runs") from None
    if not isinstance(ids, dict) or not all(isinstance(v, str) for v in ids.values()):
        raise ConfigError(f"{path}: expected {{backend: run id}}; delete it to start new backend runs")
    return ids


def _write_ids(run_dir: str, ids: dict[str, str]) -> None:
    path = os.path.join(run_dir, IDS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(ids, f, indent=2)
    os.replace(path + ".tmp", path)


class _KeepSignalHandlers:
    """Restores the stop-signal handlers a library replaced on init (swanlab takes SIGINT), so preemption
    handling (vlm_sft/faults.py) keeps working."""

    def __enter__(self) -> None:
        main = threading.current_thread() is threading.main_thread()
        self._saved = {s: signal.getsignal(s) for s in STOP_SIGNALS} if main else {}

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            if handler is not None and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def open_backends(names: tuple[str, ...] | list[str], run_dir: str, *, project: str, experiment: str,
                  run_config: Mapping[str, Any] | None = None, resume: bool = True) -> list[Backend]:
    """The named backends, started. resume: wandb and swanlab continue the runs recorded in logger_ids.json (a
    run resumed from a checkpoint); else they start new runs (a fresh start from step 0 in an old run dir: its
    steps would go back in time in the old run, which wandb drops).

    A backend that cannot start (no network and no offline mode, no login) is a ConfigError naming it: better
    than a run whose dashboard silently stays empty."""
    names = check_backends(names)
    ids = read_ids(run_dir) if resume and set(names) - {"tensorboard"} else {}
    opened: list[Backend] = []
    try:
        for name in names:
            if name == "tensorboard":
                opened.append(TensorBoard(run_dir))
                continue
            cls = Wandb if name == "wandb" else SwanLab
            env = "WANDB_MODE" if name == "wandb" else "SWANLAB_MODE"
            try:
                with _KeepSignalHandlers():
                    backend = cls(run_dir, project=project, experiment=experiment,
                                  run_config=dict(run_config or {}), run_id=ids.get(name))
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise ConfigError(f"{FIELD}: {name} did not start ({type(e).__name__}: {first}); without network "
                                  f"or login set {env}=offline") from None
            opened.append(backend)
            if ids.get(name) != backend.run_id:
                ids[name] = backend.run_id
                _write_ids(run_dir, ids)
    except BaseException:
        for backend in opened:
            backend.close()
        raise
    return opened
