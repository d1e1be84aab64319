"""Run directories: what is in one (Run), their names, the lock a training holds, checkpoints, resume.

    outputs/<run>/  config.yaml run.json adapter/ checkpoints/checkpoint-N/ loss.png tb/ .lock

Every part of nekotune that looks at a run (training, model resolution, serve, the UI, estimate)
goes through this module: the layout, the latest run and which run owns an adapter are decided
here only.

One process trains into a run directory at a time. It holds an exclusive lock on `<run>/.lock`
for the whole run (filelock: flock on POSIX, LockFileEx on Windows). The operating system drops
the lock when the process ends, however it ends, so a killed run never leaves a stale lock
behind. In a torchrun job only rank 0 holds it; the other ranks write into the directory rank 0
chose, on its behalf.
"""

from __future__ import annotations

import errno
import secrets
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

from nekotune.errors import UserError

LOCK_FILE = ".lock"
COMPLETE = "NEKOTUNE_COMPLETE"  # written last, atomically: a checkpoint without it was cut off mid-save


# -- one run directory -----------------------------------------------------------------------
def read_run_config(path: Path) -> dict:
    """A run's config.yaml as written by train (empty when it has none); it is data: safe_load only."""
    import yaml

    if not path.is_file():
        return {}
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"{path}: cannot read ({str(exc).splitlines()[0]}); the file is damaged") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a config must be a mapping of sections; the file is damaged")
    return raw


class Run:
    """One run directory: its layout, what training wrote there, and its checkpoints.

    A Run is os.PathLike, so it goes wherever a path does (`nekotune.load(run)`, `open`, Path)."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        self.name = self.dir.name
        self.config_file = self.dir / "config.yaml"  # the effective config it was trained with
        self.run_json = self.dir / "run.json"  # data statistics, losses, speed, memory, versions
        self.adapter = self.dir / "adapter"  # PEFT format, with the tokenizer
        self.checkpoints = self.dir / "checkpoints"  # checkpoint-N/, each complete once it holds COMPLETE
        self.loss_plot = self.dir / "loss.png"
        self.tensorboard = self.dir / "tb"
        self.lock_file = self.dir / LOCK_FILE

    # what is in it
    @property
    def finished(self) -> bool:
        """Training ended and saved its adapter."""
        return (self.adapter / "adapter_config.json").is_file()

    def config(self) -> dict:
        return read_run_config(self.config_file)

    @property
    def metrics(self) -> dict:
        """run.json: data statistics, losses, tokens/s, wall time, peak memory, versions."""
        from nekotune.io import read_json

        return read_json(self.run_json) if self.run_json.is_file() else {}

    def last_checkpoint(self) -> Path | None:
        return last_checkpoint(self.dir)

    @property
    def best_checkpoint(self) -> Path | None:
        """With train.load_best: the checkpoint adapter/ was taken from (run.json best_checkpoint)."""
        name = self.metrics.get("best_checkpoint")
        if not isinstance(name, str) or not name:
            return None
        path = (self.dir / name).resolve()
        # run.json is data: a best_checkpoint outside this run directory is not followed
        return path if path.is_relative_to(self.dir.resolve()) else None

    @property
    def locked(self) -> bool:
        return is_locked(self.dir)

    @classmethod
    def owning(cls, path: str | Path) -> "Run | None":
        """The run an adapter or checkpoint directory belongs to (run/adapter, run/checkpoints/checkpoint-N)."""
        p = Path(path)
        for parent in (p.parent, p.parent.parent):
            if (parent / "config.yaml").is_file():
                return cls(parent)
        return None

    def __fspath__(self) -> str:
        return str(self.dir)

    def __str__(self) -> str:
        return str(self.dir)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, Run) and other.dir == self.dir

    def __hash__(self) -> int:
        return hash(self.dir)


def list_runs(root: str | Path) -> list[Run]:
    """Finished runs under `root`, newest adapter first."""
    root = Path(root)
    if not root.is_dir():
        return []
    runs = [Run(d) for d in root.iterdir() if d.is_dir() and Run(d).finished]
    return sorted(runs, key=lambda r: (r.adapter / "adapter_config.json").stat().st_mtime, reverse=True)


def latest_run(root: str | Path = "outputs") -> Run | None:
    """The finished run whose adapter was written last: what `--model` means when not given."""
    runs = list_runs(root)
    return runs[0] if runs else None


# -- the lock --------------------------------------------------------------------------------
class RunLock:
    """The exclusive hold on one run directory; `acquire` never waits."""

    def __init__(self, run: str | Path):
        from filelock import FileLock

        self.run = Path(run)
        self._lock = FileLock(str(self.run / LOCK_FILE))
        self._made_dir = self._made_file = False

    def acquire(self, new: bool = False) -> bool:
        """Take the lock, creating the directory; False when another process holds it, or, with
        `new`, when the directory already exists (two runs given the same fresh name)."""
        from filelock import Timeout

        try:
            existed = self.run.is_dir()
            if new and existed:
                return False
            self.run.mkdir(parents=True, exist_ok=not new)
            self._made_dir = not existed
            self._made_file = not (self.run / LOCK_FILE).exists()
            self._lock.acquire(blocking=False)
        except FileExistsError:
            if new and self.run.parent.is_dir():
                return False  # made by another process a moment ago
            raise UserError(f"{self.run} or a folder above it is a file; set output.dir to a directory") from None
        except Timeout:
            return False
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"disk full while creating {self.run}; free some space and train again") from None
            raise UserError(f"cannot create the run directory {self.run} ({exc.strerror or exc}); set output.root "
                            f"or output.dir to a directory you can write") from None
        return True

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def release(self) -> None:
        """Let go. What the lock alone created (the lock file, the directory) is removed again when
        nothing else was written, so a run that failed before it started leaves nothing behind."""
        if not self._lock.is_locked:
            return
        lock_path = self.run / LOCK_FILE
        empty = self._made_file and [p.name for p in self.run.iterdir()] == [LOCK_FILE]
        if empty:
            lock_path.unlink(missing_ok=True)  # before letting go: no newcomer opens a file that is about to vanish
        self._lock.release()
        if empty and self._made_dir:
            try:
                self.run.rmdir()
            except OSError:  # someone wrote into it meanwhile: it is theirs now
                pass

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def is_locked(run: str | Path) -> bool:
    """Whether another process (or another RunLock in this one) holds `run`."""
    from filelock import FileLock, Timeout

    path = Path(run) / LOCK_FILE
    if not path.is_file():  # a holder always has the file; probing must not create one in someone's run
        return False
    probe = FileLock(str(path))
    try:
        probe.acquire(blocking=False)
    except Timeout:
        return True
    except OSError:  # unreadable: nobody can train there through nekotune either
        return False
    probe.release()
    return False


def in_use_error(run: Path) -> UserError:
    return UserError(f"{run} is in use: another nekotune process is training into it (it holds {run / LOCK_FILE}); "
                     f"wait until that run ends, or train into another directory with output.dir=...")


# -- names -----------------------------------------------------------------------------------
def short_model_name(name: str) -> str:
    return Path(name.rstrip("/")).name.replace(".", "-")[:40] or "model"


def new_run_name(model_name: str) -> str:
    """`<model>-<YYYYmmdd-HHMMSS>-<4 hex>`: sortable by start time; the random tail keeps runs
    started in the same second apart (and the directory is then created exclusively)."""
    return f"{short_model_name(model_name)}-{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


# -- checkpoints -----------------------------------------------------------------------------
def last_checkpoint(run: Path) -> Path | None:
    ckpts = [d for d in (Path(run) / "checkpoints").glob("checkpoint-*")
             if d.is_dir() and d.name.split("-")[-1].isdigit() and (d / COMPLETE).is_file()]
    return max(ckpts, key=lambda d: int(d.name.split("-")[-1])) if ckpts else None


def remove_incomplete_checkpoints(run: Path) -> None:
    """A kill during a save leaves a checkpoint without its marker; it must never be resumed
    from, and the Trainer would otherwise refuse to write over it. Only the holder of the run's
    lock may call this: another process's checkpoint in progress looks just the same."""
    for d in (Path(run) / "checkpoints").glob("checkpoint-*"):
        if d.is_dir() and not (d / COMPLETE).is_file():
            shutil.rmtree(d, ignore_errors=True)


def latest_checkpointed_run(root: Path, unfinished_only: bool = False) -> Path | None:
    """The run under `root` with the newest complete checkpoint, skipping runs that another
    process is training (resuming one would race it for its checkpoints)."""
    if not root.is_dir():
        return None
    runs = [d for d in root.iterdir() if d.is_dir() and last_checkpoint(d) is not None
            and not (unfinished_only and (d / "adapter").exists()) and not is_locked(d)]
    return max(runs, key=_checkpoint_time) if runs else None


def _checkpoint_time(run: Path) -> float:
    ckpt = last_checkpoint(run)
    return ckpt.stat().st_mtime if ckpt is not None else 0.0


# -- disk full -------------------------------------------------------------------------------
# How a full disk reads when it does not arrive as OSError(ENOSPC): safetensors raises
# SafetensorError("... I/O error: No space left on device (os error 28)"), torch.save's zip
# writer RuntimeError("[enforce fail at inline_container.cc] . unexpected pos ...") from
# "basic_ios::clear: iostream error" (older releases: "file write failed"), its legacy writer
# RuntimeError("write(): fd 3 failed with No space left on device").
_FULL = ("no space left on device", "os error 28", "errno 28", "storagefull", "disk quota exceeded", "os error 122")
_WRITE_FAILED = ("file write failed", "unexpected pos", "iostream error", "i/o error", "failed writing")
NEARLY_FULL_BYTES = 64 * 2**20


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < 16:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException, where: Path) -> bool:
    """Whether `exc`, raised while writing under `where`, means the disk (or quota) is full. A bare
    write failure counts only when the disk is indeed nearly full: the message says nothing else."""
    chain = list(_chain(exc))
    if any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain):
        return True
    if isinstance(exc, UserError):  # ours, already one line
        return False
    texts = [str(e).lower() for e in chain]
    if any(m in t for t in texts for m in _FULL):
        return True
    if any(m in t for t in texts for m in _WRITE_FAILED):
        probe = Path(where)
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            return shutil.disk_usage(probe).free < NEARLY_FULL_BYTES
        except OSError:
            return False
    return False


# -- choosing the run directory --------------------------------------------------------------
RESUME_MUST_MATCH = ("model.name_or_path", "model.quantization", "data.path", "data.format", "data.columns",
                     "data.max_seq_len", "data.system_prompt", "data.val_size", "lora.r", "lora.alpha",
                     "lora.target_modules", "lora.modules_to_save", "lora.use_dora", "lora.use_rslora",
                     "train.batch_size", "train.grad_accum", "train.seed")
# issue 16 (rows, their source) and issue 18 (the objective): keys that must match too, with the
# value a run saved before they existed had
RESUME_NEW_KEYS = {"data.repeat": 1, "data.hub": None, "model.hub": None, "data.dataset": None,
                   "train.stage": "sft", "train.pref_beta": None, "train.pref_loss": "sigmoid",
                   "train.pref_ftx": 0.0, "train.simpo_gamma": 0.5}


def check_resume_compatible(cfg: Any, run: Path) -> None:
    if not (run / "config.yaml").is_file():
        return
    saved = read_run_config(run / "config.yaml")
    now = cfg.to_dict()
    for key in (*RESUME_MUST_MATCH, *RESUME_NEW_KEYS):
        a, b = _dig(saved, key), _dig(now, key)
        if a is None and key in RESUME_NEW_KEYS:
            a = RESUME_NEW_KEYS[key]
        if a != b:
            raise UserError(f"cannot resume {run}: {key} was {a!r} and is now {b!r}; use the same config "
                            f"or start a new run (output.dir=...)")


def _compatible(cfg, run: Path) -> bool:
    try:
        check_resume_compatible(cfg, run)
        return True
    except UserError:
        return False


def _dig(d: dict, dotted: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def chosen_run(cfg: Any) -> Path | None:
    """The existing run directory the config names (output.dir, output.run_name) or that
    train.resume picks; None when the run gets a new directory."""
    if cfg.output.dir:
        return Path(cfg.output.dir)
    root = Path(cfg.output.root)
    if cfg.output.run_name:
        return root / cfg.output.run_name
    if cfg.train.resume in (True, "auto"):
        # auto only picks up an unfinished run with the same settings; true takes the latest one
        latest = latest_checkpointed_run(root, unfinished_only=cfg.train.resume == "auto")
        if latest is not None and (cfg.train.resume is True or _compatible(cfg, latest)):
            return latest
        if cfg.train.resume is True:
            raise UserError(f"train.resume=true but no run under {root}/ has a checkpoint (runs another process "
                            f"is training are skipped); set output.dir to the run to resume, or train.resume=false")
    return None


def run_dir_for(cfg: Any) -> Path:
    """Where a training with this config goes (a new name is not reserved: see claim_run_dir)."""
    return chosen_run(cfg) or Path(cfg.output.root) / new_run_name(cfg.model.name_or_path)


def _claim(cfg) -> tuple[Path, RunLock]:
    run = chosen_run(cfg)
    if run is not None:
        from nekotune.io import claim_run_dir as refuse_foreign_dir

        # a user's own non-empty folder is never trained into (a run or an empty folder is fine)
        refuse_foreign_dir(run, "output.dir" if cfg.output.dir else "output.run_name")
        lock = RunLock(run)
        if not lock.acquire():
            raise in_use_error(run)
        return run, lock
    root = Path(cfg.output.root)
    for _ in range(32):
        lock = RunLock(root / new_run_name(cfg.model.name_or_path))
        if lock.acquire(new=True):
            return lock.run, lock
    raise UserError(f"could not make a new run directory under {root}/ (every name tried exists); "
                    f"set output.dir")


_REFUSED = "\0refused:"


def claim_run_dir(cfg: Any) -> tuple[Path, RunLock | None]:
    """Rank 0 chooses the run directory and locks it; every rank takes rank 0's choice (or its
    refusal, so that no rank waits for a run that will not start). Ranks other than 0 get no lock."""
    from nekotune.distributed import agree_on, is_main_process

    lock, answer = None, ""
    if is_main_process():
        try:
            run, lock = _claim(cfg)
            answer = str(run)
        except UserError as exc:
            answer = _REFUSED + str(exc)
    answer = agree_on(answer)
    if answer.startswith(_REFUSED):
        raise UserError(answer[len(_REFUSED):])
    return Path(answer), lock


def resume_checkpoint(cfg: Any, run: Path) -> Path | None:
    if cfg.train.resume is False:
        return None
    ckpt = last_checkpoint(run)
    if ckpt is None and cfg.train.resume is True:
        raise UserError(f"train.resume=true but {run}/checkpoints holds no checkpoint; use train.resume=auto "
                        f"to start fresh when there is none")
    return ckpt
