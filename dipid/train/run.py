"""Run folders shared by the training loops: config, history, resumable state, error handling.

A run folder holds::

    config.json          every option, the data specs, dipid/torch versions, the resume log
    history.csv          one row per finished epoch (rewritten atomically after each)
    history.html         losses and metrics over time (plotly, standalone offline HTML)
    best.safetensors     model checkpoint with the best validation metric so far
    last.safetensors     model checkpoint of the last finished epoch
    state.safetensors    everything ``--resume`` needs: model, optimiser, scheduler, grad scaler,
                         epoch, best metric, RNG states (tensors under flattened keys)
    state.json           the non-tensor structure of the state, human readable

Nothing here is pickled. Nested state (an optimiser's ``state_dict()`` has int keys, tuples and
non-finite floats) is split by :func:`flatten_state` into a flat ``{key: tensor}`` dict stored
with safetensors and a JSON structure that names those keys; the structure is also stored in the
safetensors header, so ``state.safetensors`` alone is a complete, atomically written state and a
crash between two file renames cannot leave a mismatched pair.

Every file is written through a temporary file and a rename; ``state.safetensors`` is written
last at the end of an epoch, so it is the commit point: on resume, history rows after the epoch
it records are dropped and those epochs are run again.

:func:`run_training` is the life cycle of every run folder, written once: read the data, make or
check the folder, compare the options with a resumed run's, build, restore, write config.json
and its resume log, then epochs of train, check the weights, validate, save. What differs
between the TLM and the SSLM is a :class:`TrainingTask` (:class:`dipid.train.tlm.TLMTask`,
:class:`dipid.train.sslm_run.SSLMTask`).

Choices, and why:

* **The data is read before the folder is made**, so bad label files or unreadable scans stop a
  run without leaving an empty run folder behind.
* **The weights are checked after training and before validation**: NaN/inf weights stop the
  run with the last good epoch on disk, without spending a validation pass on them.
* **Best epoch** (:func:`is_improvement`): a better metric wins; an equal metric wins only with
  a lower tie-break loss where the task names one (otherwise the earlier epoch keeps its place);
  a NaN metric never wins.
* **The RNG states are restored last** on resume, after everything that is built has drawn its
  random numbers, and saved with every epoch, so 2 epochs straight and 1 + resume 1 give the
  same history.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dipid import __version__
from dipid.errors import CheckpointError, TrainingError
from dipid.files import atomic_copy, atomic_path, atomic_write_text, to_jsonable
from dipid.models import save_checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "HISTORY_CSV",
    "HISTORY_HTML",
    "BEST_CHECKPOINT",
    "LAST_CHECKPOINT",
    "STATE_FILE",
    "STATE_JSON",
    "RunFolder",
    "RunSummary",
    "RunProgress",
    "RunContext",
    "RunOptions",
    "TrainingTask",
    "HistoryLayout",
    "BestRule",
    "run_training",
    "check_option_names",
    "is_improvement",
    "AmpSettings",
    "FlatState",
    "flatten_state",
    "unflatten_state",
    "save_state",
    "load_state",
    "derive_seed",
    "seed_everything",
    "seed_worker",
    "capture_rng_state",
    "restore_rng_state",
    "amp_settings",
    "is_out_of_memory",
    "training_guard",
    "loss_mode",
    "all_finite",
    "compare_configs",
    "write_history_csv",
    "read_history_csv",
    "history_figure",
    "write_history_html",
    "atomic_save_safetensors",
    "versions",
    "now_iso",
    "call_callback",
    "TrainEvent",
]

CONFIG_FILE = "config.json"
HISTORY_CSV = "history.csv"
HISTORY_HTML = "history.html"
BEST_CHECKPOINT = "best.safetensors"
LAST_CHECKPOINT = "last.safetensors"
STATE_FILE = "state.safetensors"
STATE_JSON = "state.json"

#: Version of the state format; bumped when the layout changes incompatibly.
STATE_FORMAT_VERSION = 1
_STRUCTURE_KEY = "dipid_state"
_FORMAT_KEY = "format"
_FORMAT_NAME = "dipid-train-state"


# ================================================================================ result types
@dataclass
class RunSummary:
    """What a finished training run produced.

    Attributes:
        run_dir: the run folder.
        kind: "tlm" or "sslm".
        epochs_completed: epochs finished in total (including those before a resume).
        best_epoch: the epoch whose weights are in ``best.safetensors`` (None if none finished).
        best_metric_name: what "best" means ("val_iou", "val_loss", "loss", ...).
        best_metric: its value at ``best_epoch``.
        resumed_from_epoch: the epoch the run continued from, None for a fresh run.
        history: the rows of ``history.csv`` (column -> value).
        seconds: wall time of this call.
    """

    run_dir: Path
    kind: str
    epochs_completed: int
    best_epoch: int | None
    best_metric_name: str
    best_metric: float | None
    resumed_from_epoch: int | None
    history: list[dict[str, float]]
    seconds: float

    @property
    def best_checkpoint(self) -> Path:
        """Path of ``best.safetensors``."""
        return self.run_dir / BEST_CHECKPOINT

    @property
    def last_checkpoint(self) -> Path:
        """Path of ``last.safetensors``."""
        return self.run_dir / LAST_CHECKPOINT


@dataclass
class RunProgress:
    """Mutable note of how far a run got, read by :func:`training_guard` for its messages.

    Attributes:
        unit: what is counted ("epoch").
        saved: the last finished unit whose state is on disk (None: nothing saved yet).
        current: the unit being worked on.
    """

    unit: str = "epoch"
    saved: int | None = None
    current: int | None = None

    def describe(self) -> str:
        """One sentence on what is on disk."""
        if self.saved is None:
            return f"no {self.unit} had finished, so the run will start again from the beginning"
        return f"{self.unit} {self.saved} is the last one saved and the run continues after it"


@dataclass
class TrainEvent:
    """What a training callback is told.

    Attributes:
        kind: "step" (after an optimiser step) or "epoch" (after an epoch is saved and its row written).
        epoch: 1-based epoch.
        step: 1-based step within the epoch ("step" events) or steps in the epoch ("epoch").
        global_step: optimiser steps since the run began.
        losses: this step's loss terms ("step") or the epoch's history row ("epoch").
    """

    kind: str
    epoch: int
    step: int
    global_step: int
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class RunFolder:
    """Paths of the files in one run folder (see the module docstring)."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history_csv(self) -> Path:
        return self.path / HISTORY_CSV

    @property
    def history_html(self) -> Path:
        return self.path / HISTORY_HTML

    @property
    def best(self) -> Path:
        return self.path / BEST_CHECKPOINT

    @property
    def last(self) -> Path:
        return self.path / LAST_CHECKPOINT

    @property
    def state(self) -> Path:
        return self.path / STATE_FILE

    @property
    def state_json(self) -> Path:
        return self.path / STATE_JSON

    def read_config(self) -> dict[str, Any] | None:
        """The stored config.json, or None if there is none."""
        if not self.config.is_file():
            return None
        try:
            return json.loads(self.config.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TrainingError(
                f"{self.config}: not valid JSON ({exc}); delete the run folder or choose another --out"
            ) from exc

    def write_config(self, config: Mapping[str, Any]) -> Path:
        """Write config.json atomically."""
        return atomic_write_text(self.config, json.dumps(to_jsonable(config), indent=2, sort_keys=False) + "\n")

    def prepare(self, *, resume: bool, kind: str) -> dict[str, Any] | None:
        """Create the folder, or check it may be used.

        A fresh run refuses a folder that already holds a run (so a finished run is never
        overwritten by accident); ``resume`` needs a folder from the same kind of training.

        Returns:
            the existing config when resuming (None for a fresh run or an empty folder).
        """
        existing = self.read_config()
        if not resume:
            if existing is not None or self.state.is_file() or self.history_csv.is_file():
                raise TrainingError(
                    f"{self.path}: this folder already holds a training run; add --resume to continue it "
                    "or choose a new --out folder"
                )
            self.path.mkdir(parents=True, exist_ok=True)
            return None
        if existing is None:
            logger.warning("%s: nothing to resume (no %s); starting a new run there", self.path, CONFIG_FILE)
            self.path.mkdir(parents=True, exist_ok=True)
            return None
        if existing.get("kind") != kind:
            raise TrainingError(
                f"{self.config}: this folder holds a {existing.get('kind')!r} run, not {kind!r}; "
                f"resume it with `dipid train {existing.get('kind')} ... --resume` or choose another --out"
            )
        return existing


# ================================================================================ state files
@dataclass
class FlatState:
    """A nested state split into tensors and a JSON-able structure naming them."""

    tensors: dict[str, torch.Tensor]
    structure: Any


def flatten_state(state: Any) -> FlatState:
    """Split nested dicts/lists/tuples of tensors, arrays and scalars into tensors + JSON structure.

    Tensors become ``{"__tensor__": key}`` (key = the dotted path to them); numpy arrays
    ``{"__ndarray__": key, "dtype": ...}``; tuples ``{"__tuple__": [...]}``; dicts with non-str
    keys (an optimiser's per-parameter state) ``{"__dict__": [[key, value], ...]}``; non-finite
    floats ``{"__float__": "nan"}``. Anything else (an arbitrary object) is refused: the state must
    never need pickle.

    Raises:
        TypeError: a value that is none of the above.
    """
    tensors: dict[str, torch.Tensor] = {}
    storages: set[tuple[str, int]] = set()

    def key_for(path: list[str]) -> str:
        key = ".".join(path) or "root"
        unique, n = key, 1
        while unique in tensors:
            unique, n = f"{key}~{n}", n + 1
        return unique

    def encode(value: Any, path: list[str]) -> Any:
        if isinstance(value, torch.Tensor):
            key = key_for(path)
            tensor = value.detach().to("cpu").contiguous()
            # safetensors refuses tensors that share storage; copy only those (copying every
            # tensor of a Mask R-CNN state costs seconds per epoch).
            storage = (str(value.device), tensor.untyped_storage().data_ptr())
            if storage in storages:
                tensor = tensor.clone()
            storages.add((str(value.device), tensor.untyped_storage().data_ptr()))
            tensors[key] = tensor
            return {"__tensor__": key}
        if isinstance(value, np.ndarray):
            key = key_for(path)
            # Widen unsigned ints that torch stores poorly (numpy's RNG keys are uint32).
            array = value.astype(np.int64) if value.dtype.kind == "u" and value.dtype.itemsize >= 2 else value
            tensors[key] = torch.from_numpy(np.ascontiguousarray(array).copy())
            return {"__ndarray__": key, "dtype": value.dtype.str}
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        if isinstance(value, (int, np.integer)):
            return int(value)
        if isinstance(value, (float, np.floating)):
            value = float(value)
            return value if math.isfinite(value) else {"__float__": repr(value)}
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, tuple):
            return {"__tuple__": [encode(v, [*path, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, list):
            return [encode(v, [*path, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, Mapping):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
            if plain:
                return {k: encode(v, [*path, k]) for k, v in value.items()}
            return {"__dict__": [[encode(k, [*path, "key"]), encode(v, [*path, str(k)])] for k, v in value.items()]}
        raise TypeError(f"cannot store {type(value).__name__} at {'.'.join(path) or 'root'} without pickle")

    structure = encode(state, [])
    return FlatState(tensors=tensors, structure=structure)


def unflatten_state(structure: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""

    def decode(node: Any) -> Any:
        if isinstance(node, list):
            return [decode(v) for v in node]
        if isinstance(node, dict):
            if "__tensor__" in node:
                return tensors[node["__tensor__"]]
            if "__ndarray__" in node:
                return tensors[node["__ndarray__"]].numpy().astype(np.dtype(node["dtype"]))
            if "__tuple__" in node:
                return tuple(decode(v) for v in node["__tuple__"])
            if "__dict__" in node:
                return {_hashable(decode(k)): decode(v) for k, v in node["__dict__"]}
            if "__float__" in node:
                return float(node["__float__"])
            return {k: decode(v) for k, v in node.items()}
        return node

    return decode(structure)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, *, metadata: Mapping[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temp:
        save_file(dict(tensors), temp, metadata=dict(metadata) if metadata else None)
    return path


def save_state(path: str | Path, state: Mapping[str, Any], *, summary: Mapping[str, Any] | None = None) -> Path:
    """Write a nested training state to ``path`` (safetensors) and its structure beside it as JSON.

    Args:
        path: the ``.safetensors`` file; the JSON goes to the same name with ``.json``.
        state: nested dicts/lists of tensors, numpy arrays and scalars (see :func:`flatten_state`).
        summary: small JSON-able facts shown at the top of the JSON (epoch, best metric, ...).
    Returns:
        the safetensors path.
    """
    path = Path(path)
    flat = flatten_state(dict(state))
    doc = {
        _FORMAT_KEY: _FORMAT_NAME,
        "version": STATE_FORMAT_VERSION,
        "summary": to_jsonable(dict(summary or {})),
        "structure": flat.structure,
    }
    text = json.dumps(doc, allow_nan=False)
    atomic_save_safetensors(flat.tensors, path, metadata={_STRUCTURE_KEY: text})
    # The JSON copy is for people; the structure inside the safetensors header is what loads.
    atomic_write_text(path.with_suffix(".json"), json.dumps(doc, indent=1, allow_nan=False) + "\n")
    return path


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a state written by :func:`save_state`.

    Returns:
        (state, summary): the nested state with tensors on the CPU, and the summary dict.
    Raises:
        CheckpointError: the file is missing, damaged or not a dipid training state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no training state; the run has not finished an epoch yet")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointError(
            f"{path}: cannot read the training state ({exc}); the file is damaged. Start a new run "
            "(choose another --out) or restore the file"
        ) from exc
    try:
        doc = json.loads(metadata[_STRUCTURE_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: no '{_STRUCTURE_KEY}' entry in the safetensors header; not a dipid training state"
        ) from exc
    if doc.get(_FORMAT_KEY) != _FORMAT_NAME or int(doc.get("version", -1)) > STATE_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: training state format {doc.get(_FORMAT_KEY)!r} version {doc.get('version')} is not one this "
            f"dipid reads (version <= {STATE_FORMAT_VERSION}); resume it with the dipid version that wrote it"
        )
    return unflatten_state(doc["structure"], tensors), doc.get("summary", {})


# ================================================================================ seeds, RNG
def derive_seed(seed: int, *parts: object) -> int:
    """A stable 31-bit seed from a base seed and labels, e.g. ``derive_seed(0, "loader", 3)``.

    Pure: the same inputs give the same seed on every machine and Python version (no ``hash()``).
    """
    digest = hashlib.sha256(repr((int(seed), *map(str, parts))).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFF_FFFF


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy and ``random`` in a worker from torch's per-worker seed."""
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def capture_rng_state() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU, CUDA when in use) as storable values."""
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": np.asarray(internal, dtype=np.int64), "gauss_next": gauss_next},
        "numpy": {"name": np_name, "keys": np.asarray(np_keys), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], np.asarray(npst["keys"], dtype=np.uint32), int(npst["pos"]),
                         int(npst["has_gauss"]), float(npst["cached_gaussian"])))
    torch.set_rng_state(state["torch"].to(torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in cuda])
        else:
            logger.warning("the run was saved with %d CUDA devices and %d are visible now; CUDA RNG not restored",
                           len(cuda), torch.cuda.device_count())


# ================================================================================ devices, AMP
@dataclass(frozen=True)
class AmpSettings:
    """Mixed precision for one run.

    Attributes:
        enabled: whether ``torch.autocast`` is used.
        dtype: the autocast dtype (bfloat16 where the GPU has it, else float16).
        use_scaler: whether a ``GradScaler`` guards float16 gradients against underflow.
    """

    enabled: bool
    dtype: torch.dtype | None
    use_scaler: bool

    @property
    def dtype_name(self) -> str | None:
        return None if self.dtype is None else str(self.dtype).removeprefix("torch.")


def amp_settings(device: torch.device, amp: bool, *, bf16_supported: bool | None = None) -> AmpSettings:
    """Mixed precision only on CUDA and only when asked: bf16 if supported (no scaler needed), else fp16 + scaler."""
    if not amp or device.type != "cuda":
        return AmpSettings(enabled=False, dtype=None, use_scaler=False)
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if bf16_supported:
        return AmpSettings(enabled=True, dtype=torch.bfloat16, use_scaler=False)
    return AmpSettings(enabled=True, dtype=torch.float16, use_scaler=True)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA (or CPU allocator) out-of-memory errors."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


@contextmanager
def training_guard(run_dir: Path, *, progress: RunProgress, resume_command: str) -> Iterator[None]:
    """Turn out-of-memory and Ctrl-C into a :class:`TrainingError` that says how to resume.

    The original exception is kept as ``__cause__`` (the CLI can tell an interrupt by it).
    """
    try:
        yield
    except TrainingError:
        raise
    except KeyboardInterrupt as exc:
        raise TrainingError(
            f"training interrupted during {progress.unit} {progress.current}; the run folder {run_dir} is kept "
            f"({progress.describe()}). Resume with `{resume_command}`"
        ) from exc
    except (RuntimeError, MemoryError) as exc:
        if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise TrainingError(
            f"out of memory during {progress.unit} {progress.current} ({str(exc).splitlines()[0] if str(exc) else exc!r}); "
            f"the run folder {run_dir} is kept ({progress.describe()}). Resume with `{resume_command}` and a lower "
            "--batch-size (or --device cpu)"
        ) from exc


@contextmanager
def loss_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Train mode (torchvision detection models only return losses then) with BatchNorm and dropout
    in eval mode, so computing a validation loss changes no running statistics and draws no dropout.

    Restores each module's previous mode on exit.
    """
    modes = {m: m.training for m in model.modules()}
    model.train()
    for module in model.modules():
        if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
            module.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode


def all_finite(model: torch.nn.Module) -> bool:
    """True if every trainable parameter of ``model`` is finite (frozen ones cannot have changed).

    One sum per tensor: NaN and inf propagate through it, and it allocates nothing the size of
    the weights.
    """
    with torch.no_grad():
        sums = [p.detach().sum() for p in model.parameters() if p.requires_grad and p.is_floating_point()]
        return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def compare_configs(old: Mapping[str, Any], new: Mapping[str, Any], *, fixed: Sequence[str]) -> dict[str, tuple[Any, Any]]:
    """Options that differ between a stored run and a resume request.

    Args:
        old, new: option dicts (as stored in config.json).
        fixed: names that must not change on resume (they shape the model or optimiser).
    Returns:
        {name: (old, new)} for every differing option.
    Raises:
        TrainingError: a ``fixed`` option differs.
    """
    old_j, new_j = to_jsonable(dict(old)), to_jsonable(dict(new))
    changed = {k: (old_j.get(k), new_j.get(k)) for k in sorted(set(old_j) | set(new_j)) if old_j.get(k) != new_j.get(k)}
    bad = {k: v for k, v in changed.items() if k in fixed}
    if bad:
        listing = "; ".join(f"{k}: run has {a!r}, asked {b!r}" for k, (a, b) in bad.items())
        raise TrainingError(f"cannot resume with different settings ({listing}); use the run's settings or a new --out")
    return changed


# ================================================================================ history
def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)  # shortest exact form: a resumed run's rows compare equal to the originals
    return str(value)


def write_history_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write all rows (rewritten whole, atomically) with the given column order."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_format_cell(row.get(c)) for c in columns])
    return atomic_write_text(path, buffer.getvalue())


def read_history_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a history.csv as {column: float} (integers for ``epoch``/``step``; empty -> nan)."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for record in csv.DictReader(fh):
            row: dict[str, float] = {}
            for key, text in record.items():
                value = float(text) if text not in ("", None) else math.nan
                row[key] = int(value) if key in ("epoch", "step") and math.isfinite(value) else value
            rows.append(row)
    return rows


def history_figure(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str,
    loss_columns: Sequence[str],
    metric_columns: Sequence[str],
    title: str,
) -> "plotly.graph_objects.Figure":  # noqa: F821 - plotly is imported lazily
    """Plotly figure: losses (log y) on top, metrics below, learning rate at the bottom.

    Args:
        rows: history rows (column -> value); NaN or missing values leave gaps.
        x: the column on the x axis ("epoch" or "step").
        loss_columns, metric_columns: columns drawn in the top and middle panels (all-NaN ones are skipped).
    """
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, vertical_spacing=0.06,
                        subplot_titles=("losses", "metrics", "learning rate"),
                        row_heights=[0.5, 0.3, 0.2])
    xs = [r.get(x) for r in rows]

    def add(column: str, row: int) -> None:
        ys = [r.get(column) for r in rows]
        if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in ys):
            return
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=column), row=row, col=1)

    for column in loss_columns:
        add(column, 1)
    for column in metric_columns:
        add(column, 2)
    add("lr", 3)
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_yaxes(type="log", row=3, col=1)
    fig.update_xaxes(title_text=x, row=3, col=1)
    fig.update_layout(title=title, height=900, template="plotly_white")
    return fig


def write_history_html(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str,
    loss_columns: Sequence[str],
    metric_columns: Sequence[str],
    title: str,
) -> Path:
    """Write :func:`history_figure` as standalone HTML (plotly.js embedded: opens offline), atomically."""
    fig = history_figure(rows, x=x, loss_columns=loss_columns, metric_columns=metric_columns, title=title)
    return atomic_write_text(path, fig.to_html(include_plotlyjs=True, full_html=True))


# ================================================================================ helpers
def versions() -> dict[str, str]:
    """dipid, torch and torchvision versions for config.json."""
    # Here, not at the top: imported after dipid.models has checked the torch/torchvision pair.
    import torchvision

    return {"dipid": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__}


def now_iso() -> str:
    """Local time as ISO 8601 with offset, to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def call_callback(callback: Callable[[Any], None] | None, event: Any) -> None:
    """Call a user callback (a KeyboardInterrupt it raises is handled like Ctrl-C)."""
    if callback is not None:
        callback(event)


def check_option_names(options_class: type, options: Mapping[str, Any], *, caller: str) -> None:
    """Refuse keyword options that are not fields of ``options_class``, naming the valid ones.

    Raises:
        TypeError: an unknown option (as Python does for an unknown keyword argument).
    """
    known = {f.name for f in fields(options_class)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"{caller}() got unknown options {unknown}; valid: {sorted(known)}")


# ================================================================================ the life cycle
def is_improvement(
    metric: float, loss: float, best_metric: float | None, best_loss: float | None, *, higher_is_better: bool
) -> bool:
    """Whether an epoch beats the best so far: a better metric, or an equal metric and a lower loss.

    A NaN metric never improves; anything else beats "no best yet". With ``best_loss`` None an
    equal metric does not improve (the earlier epoch keeps its place).
    """
    if math.isnan(metric):
        return False
    if best_metric is None or math.isnan(best_metric):
        return True
    if metric != best_metric:
        return metric > best_metric if higher_is_better else metric < best_metric
    return best_loss is not None and math.isfinite(loss) and loss < best_loss


@dataclass(frozen=True)
class HistoryLayout:
    """How one kind of run reports its epochs.

    Attributes:
        columns: history.csv columns, in order (every key of an epoch's row is one of them).
        x: the history.html x axis ("epoch" or "step").
        loss_columns, metric_columns: the history.html loss and metric panels.
        log_columns: the columns of the log line after each epoch.
    """

    columns: tuple[str, ...]
    x: str
    loss_columns: tuple[str, ...]
    metric_columns: tuple[str, ...]
    log_columns: tuple[str, ...]


@dataclass(frozen=True)
class BestRule:
    """Which epoch ``best.safetensors`` holds (see :func:`is_improvement`).

    Attributes:
        metric: the history column that decides ("val_iou", "val_loss", "loss").
        higher_is_better: whether a larger ``metric`` is better.
        tie_loss: the history column whose lower value wins a tie of ``metric``; None: ties keep
            the earlier epoch.
    """

    metric: str
    higher_is_better: bool
    tie_loss: str | None = None


@dataclass
class RunContext:
    """What a :class:`TrainingTask` sees of the run it is in (owned by :func:`run_training`).

    Attributes:
        folder: the run folder.
        progress: which epoch is saved and which is running (for error messages).
        resume_command: the shell command that resumes the run.
        callback: the user's callback (called by :meth:`after_step` and after each saved epoch).
        global_step: optimiser steps since the run began (restored on resume).
    """

    folder: RunFolder
    progress: RunProgress
    resume_command: str
    callback: Callable[[TrainEvent], None] | None = None
    global_step: int = 0

    def after_step(self, epoch: int, step: int, losses: Mapping[str, float]) -> None:
        """Count one optimiser step and tell the callback (``step`` is 1-based within the epoch)."""
        self.global_step += 1
        call_callback(self.callback, TrainEvent("step", epoch, step, self.global_step, dict(losses)))

    def stopped(self) -> str:
        """The end of an error message that stops a run: what is on disk and how to resume."""
        return (f"the run stopped and {self.folder.path} keeps the last good epoch ({self.progress.describe()}; "
                f"best.safetensors is untouched). Resume with `{self.resume_command}`")


class RunOptions(Protocol):
    """The options every kind of run has (TLMTrainOptions, SSLMTrainOptions)."""

    out: str | Path
    seed: int
    resume: bool
    lr: float

    def to_dict(self) -> dict[str, Any]:
        """Every option, JSON-ready (config.json "options")."""

    def resume_command(self) -> str:
        """The shell command that resumes the run."""


class TrainingTask(Protocol):
    """One kind of training, as :func:`run_training` drives it.

    Attributes:
        kind: "tlm" or "sslm" (config.json "kind", the ``dipid train`` sub-command).
        opts: the run's options.
        history: how epochs are reported.
        fixed_on_resume: options a resumed run may not change (they shape the model or the random stream).
        model: the module being trained (checked for NaN/inf weights after each epoch); set by ``build``.
        epochs: the run's epochs in total; valid after ``build``.
        best_rule: which epoch is best; set by ``build``.

    Methods, in the order :func:`run_training` calls them:
        load_data(): read the data (before the run folder is made).
        build(run, existing, resumed=...): the model, optimiser and what else the epochs need,
            after the global RNGs are seeded; ``existing`` is a resumed run's config.json.
        restore(state): load the task's part of a saved state (what ``state()`` returned).
        config_sections(): config.json sections of this kind ("data", "model", "optimizer",
            "device", ...), written at the start of every run and resume.
        train_epoch(run, epoch): train one epoch (calling ``run.after_step`` after each step);
            returns the row's training columns.
        validate(run, epoch): the row's validation columns.
        checkpoint(row): (module saved as last/best.safetensors, checkpoint metadata of this kind).
        state(): the task's part of state.safetensors (model, optimiser, ... ; tensors and plain values).
    """

    kind: str
    opts: RunOptions
    history: HistoryLayout
    fixed_on_resume: tuple[str, ...]
    model: torch.nn.Module
    best_rule: BestRule

    @property
    def epochs(self) -> int: ...

    def load_data(self) -> None: ...

    def build(self, run: RunContext, existing: Mapping[str, Any] | None, *, resumed: bool) -> None: ...

    def restore(self, state: Mapping[str, Any]) -> None: ...

    def config_sections(self) -> dict[str, Any]: ...

    def train_epoch(self, run: RunContext, epoch: int) -> dict[str, Any]: ...

    def validate(self, run: RunContext, epoch: int) -> dict[str, Any]: ...

    def checkpoint(self, row: Mapping[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]: ...

    def state(self) -> dict[str, Any]: ...


def run_training(task: TrainingTask, *, callback: Callable[[TrainEvent], None] | None = None) -> RunSummary:
    """Run (or, with ``task.opts.resume``, resume) one training into the run folder ``task.opts.out``.

    Args:
        task: what is trained and how (:class:`TrainingTask`).
        callback: called with a :class:`TrainEvent` after every step and every saved epoch; an
            exception it raises stops training (KeyboardInterrupt is handled like Ctrl-C).
    Returns:
        :class:`RunSummary`.
    Raises:
        TrainingError: NaN/inf weights or loss, out of memory or Ctrl-C (the message names the
            run folder and the command that resumes it; the last finished epoch is on disk), a
            folder that holds another run, or a resume that changes a fixed option.
    """
    started = time.perf_counter()
    opts = task.opts
    task.load_data()  # before the folder: bad data leaves no empty run folder behind
    folder = RunFolder(Path(opts.out))
    existing = folder.prepare(resume=opts.resume, kind=task.kind)
    run = RunContext(folder=folder, progress=RunProgress(unit="epoch"), resume_command=opts.resume_command(),
                     callback=callback)
    with training_guard(folder.path, progress=run.progress, resume_command=run.resume_command):
        seed_everything(opts.seed)
        changed: dict[str, tuple[Any, Any]] = {}
        state = None
        if existing is not None:
            changed = {k: v for k, v in compare_configs(existing.get("options", {}), opts.to_dict(),
                                                        fixed=task.fixed_on_resume).items() if k != "resume"}
            if changed:
                logger.warning("resuming %s with changed options: %s", folder.path,
                               ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
            if folder.state.is_file():
                state, _ = load_state(folder.state)

        task.build(run, existing, resumed=state is not None)
        best: dict[str, Any] = {"epoch": None, "metric": None, "loss": None}
        history: list[dict[str, Any]] = []
        resumed_from = None
        if state is not None:
            task.restore(state)
            run.global_step = int(state["global_step"])
            best.update(state["best"])  # runs saved before the tie-break loss have no "loss"
            resumed_from = run.progress.saved = int(state["epoch"])
            # Last: nothing built or restored above may draw random numbers after this.
            restore_rng_state(state["rng"])
            history = [r for r in read_history_csv(folder.history_csv) if r["epoch"] <= resumed_from]
            logger.info("resuming %s after epoch %d (step %d)", folder.path, resumed_from, run.global_step)
        _write_config(task, folder, existing, changed, resumed_from)

        start_epoch = (resumed_from or 0) + 1
        for epoch in range(start_epoch, task.epochs + 1):
            _run_epoch(task, run, epoch, history, best)
        if start_epoch > task.epochs:
            logger.info("%s already finished %d epochs (asked for %d); nothing to do", folder.path,
                        start_epoch - 1, task.epochs)
    return RunSummary(
        run_dir=folder.path,
        kind=task.kind,
        epochs_completed=run.progress.saved or 0,
        best_epoch=best["epoch"],
        best_metric_name=task.best_rule.metric,
        best_metric=best["metric"],
        resumed_from_epoch=resumed_from,
        history=[dict(r) for r in history],
        seconds=time.perf_counter() - started,
    )


def _write_config(task: TrainingTask, folder: RunFolder, existing: Mapping[str, Any] | None,
                  changed: Mapping[str, tuple[Any, Any]], resumed_from: int | None) -> None:
    """config.json: the stored one (its creation facts and resume log) updated, or a new one."""
    config = dict(existing) if existing is not None else {
        "kind": task.kind, "created": now_iso(), "versions": versions(), "resumes": []}
    config["options"] = task.opts.to_dict()
    config.update(task.config_sections())
    config["best_metric"] = task.best_rule.metric
    if existing is not None:
        config.setdefault("resumes", []).append({"time": now_iso(), "from_epoch": resumed_from, "versions": versions(),
                                                 "changed": {k: list(v) for k, v in changed.items()}})
    folder.write_config(config)


def _run_epoch(task: TrainingTask, run: RunContext, epoch: int, history: list[dict[str, Any]],
               best: dict[str, Any]) -> None:
    """Train, check, validate and save one epoch; appends its row to ``history``, updates ``best``."""
    run.progress.current = epoch
    t0 = time.perf_counter()
    first_step = run.global_step
    trained = task.train_epoch(run, epoch)
    if not all_finite(task.model):
        raise TrainingError(
            f"the {task.kind.upper()} weights became NaN/inf in epoch {epoch}; {run.stopped()} and a lower --lr "
            f"(now {task.opts.lr:.3g})"
        )
    row: dict[str, Any] = {"epoch": epoch, **trained, **task.validate(run, epoch)}
    row["seconds"] = time.perf_counter() - t0
    history.append(row)
    _save_epoch(task, run, epoch, row, history, best)
    logger.info("%s epoch %d/%d (step %d): %s", task.kind.upper(), epoch, task.epochs, run.global_step,
                ", ".join(f"{c} {row[c]:.4g}" for c in task.history.log_columns if c in row and not _is_nan(row[c])))
    call_callback(run.callback, TrainEvent("epoch", epoch, run.global_step - first_step, run.global_step, dict(row)))


def _save_epoch(task: TrainingTask, run: RunContext, epoch: int, row: Mapping[str, Any],
                history: Sequence[Mapping[str, Any]], best: dict[str, Any]) -> None:
    folder, rule = run.folder, task.best_rule
    metric = float(row[rule.metric])
    tie_loss = float(row[rule.tie_loss]) if rule.tie_loss is not None else None
    improved = is_improvement(metric, math.nan if tie_loss is None else tie_loss, best["metric"], best["loss"],
                              higher_is_better=rule.higher_is_better)
    model, metadata = task.checkpoint(row)
    metadata = to_jsonable({"run": str(folder.path), "kind": task.kind, "epoch": epoch, **metadata,
                            "best_metric": rule.metric, "dipid_version": __version__})
    # Order matters: checkpoints and history first, the state last. The state is the commit
    # point a resume starts from; anything written after an older state is redone.
    save_checkpoint(model, folder.last, metadata=metadata)
    if improved:
        best.update(epoch=epoch, metric=metric, loss=tie_loss)
        atomic_copy(folder.last, folder.best)  # same bytes; copying beats serialising again
    layout = task.history
    write_history_csv(folder.history_csv, history, layout.columns)
    write_history_html(folder.history_html, history, x=layout.x, loss_columns=layout.loss_columns,
                       metric_columns=layout.metric_columns,
                       title=f"dipid {task.kind.upper()} training: {folder.path.name}")
    state = {**task.state(), "epoch": epoch, "global_step": run.global_step, "best": dict(best),
             "rng": capture_rng_state()}
    save_state(folder.state, state, summary={
        "kind": task.kind, "epoch": epoch, "epochs": task.epochs, "global_step": run.global_step,
        "best_metric": rule.metric, "best_epoch": best["epoch"], "best_value": best["metric"], "saved": now_iso(),
    })
    run.progress.saved = epoch


def _is_nan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
