"""Artifacts: atomic writes, readers with one-line errors, manifests, the run layout.

Every file is written to a temporary name in the same folder and renamed into place, so a
reader never sees half a file. A stage's folder is complete when its manifest.json exists:
the manifest is written last and records the config, input hashes and versions. The skip /
redo / refuse rules live in cedm.pipeline; `stage_done` and `write_manifest` here are the older
per-stage helpers, kept for the stages not yet on the layer.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

MANIFEST = "manifest.json"


class CedmError(Exception):
    """A user-facing error: the CLI prints it as one line and exits non-zero."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()    # the process's umask, read once: temporary files and folders get the modes open/mkdir give


def temp_dir(parent, prefix: str) -> Path:
    """A new folder `<parent>/<prefix>*.tmp`, readable as a folder made by mkdir would be (mkdtemp
    makes 0700; a staged stage folder renamed into place must not stay private to its writer)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=parent))
    os.chmod(tmp, 0o777 & ~UMASK)
    return tmp


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it into place only if the block succeeds.
    The file has the mode a plain open() gives (0666 less the umask), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~UMASK)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def save_json(path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def load_json(path) -> Any:
    path = Path(path)
    if not path.exists():
        raise CedmError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CedmError(f"corrupt JSON file {path}: {e}") from None


def save_array(path, arr) -> None:
    """Save a numpy array as .npy atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(arr), allow_pickle=False)
    write_bytes(path, buf.getvalue())


class NpyRows:
    """Append blocks of rows to an open .npy file (`npy_rows`); `rows` counts what was written."""

    def __init__(self, f, row_shape: tuple, dtype):
        self.f, self.row_shape, self.dtype, self.rows = f, tuple(row_shape), np.dtype(dtype), 0

    def write(self, block) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {block.shape[1:]}, expected {self.row_shape}")
        if block.size:
            self.f.write(memoryview(block.reshape(-1)))
        self.rows += len(block)


@contextlib.contextmanager
def npy_rows(path, row_shape: tuple, dtype) -> Iterator[NpyRows]:
    """Write an .npy array [rows, *row_shape] block by block, atomically, holding one block in
    memory instead of the whole array (docs/performance.md#data-memory).

    The header is written first for 0 rows and rewritten in place at the end with the count:
    numpy pads every header so that the first axis can grow to 21 digits without changing its
    length, so the data offset stays put and the file is byte for byte what `save_array` writes.
    Like every write here it goes to a temporary name and is renamed into place only if the block
    succeeds (a failure leaves nothing at `path`)."""
    from numpy.lib import format as npformat

    dtype = np.dtype(dtype)

    def header(rows: int) -> dict:
        return {"descr": npformat.dtype_to_descr(dtype), "fortran_order": False,
                "shape": (rows, *tuple(row_shape))}

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            npformat.write_array_header_1_0(f, header(0))
            start = f.tell()
            writer = NpyRows(f, row_shape, dtype)
            yield writer
            f.seek(0)
            npformat.write_array_header_1_0(f, header(writer.rows))
            if f.tell() != start:       # cannot happen with numpy's padded headers; never write a torn file
                raise RuntimeError(f"npy header of {path} changed length ({start} -> {f.tell()} bytes)")
            f.flush()
            os.fsync(f.fileno())


def load_array(path, mmap: bool = False) -> np.ndarray:
    path = Path(path)
    if not path.exists():
        raise CedmError(f"missing array file: {path} (run the stage that makes it first)")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:   # truncated, torn or not an .npy file
        raise CedmError(f"cannot read {path}: {_first_line(e)}; the file is truncated or corrupt, "
                        f"redo the stage that made it (--force)") from None


def load_npz(path) -> dict:
    """All arrays of an .npz file (no pickles), read at once; a clear error when torn."""
    path = Path(path)
    if not path.exists():
        raise CedmError(f"missing array file: {path} (run the stage that makes it first)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # ValueError, OSError, zipfile.BadZipFile, ...: a torn file
        raise CedmError(f"cannot read {path}: {_first_line(e)}; the file is truncated or corrupt, "
                        f"redo the stage that made it (--force)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def save_tensors(path, tensors: dict, metadata: dict | None = None) -> None:
    """Save a dict of tensors as safetensors atomically (no pickles)."""
    from safetensors.torch import save_file

    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata={k: str(v) for k, v in (metadata or {}).items()})


def load_tensors(path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise CedmError(f"missing weights file: {path}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for torn headers/data
        raise CedmError(f"cannot read {path}: {_first_line(e)}; the file is truncated or corrupt, "
                        f"redo the stage that made it (--force)") from None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def file_hash(path, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def input_hash(path) -> str:
    """Hash of an input artifact: its manifest when it is a stage folder, else the file itself."""
    path = Path(path)
    if path.is_dir():
        m = path / MANIFEST
        if not m.exists():
            raise CedmError(f"input stage {path} is incomplete (no {MANIFEST}); run it first")
        return file_hash(m)
    if not path.exists():
        raise CedmError(f"missing input: {path}")
    return file_hash(path)


def versions() -> dict:
    import cedm

    out = {"cedm": cedm.__version__, "python": platform.python_version(), "numpy": np.__version__}
    try:
        import torch

        out["torch"] = torch.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _normalise(config: dict) -> dict:
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))


def stage_done(out_dir, config: dict, force: bool = False) -> bool:
    """True when `out_dir` holds a finished stage with the same config (skip it).

    A finished stage with a different config is an error unless `force`, which removes the
    old manifest so the stage runs again and overwrites its outputs.
    """
    m = Path(out_dir) / MANIFEST
    if not m.exists():
        return False
    old = load_json(m).get("config")
    if old == _normalise(config):
        if force:
            m.unlink()
            return False
        return True
    if force:
        m.unlink()
        return False
    diff = sorted(k for k in set(old or {}) | set(config) if (old or {}).get(k) != _normalise(config).get(k))
    raise CedmError(f"{out_dir} was made with a different config (differs in: {', '.join(diff)}); "
                    f"use --force to redo it, or another --run-dir")


def write_manifest(out_dir, stage: str, config: dict, inputs=(), outputs: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Write the stage manifest last, marking `out_dir` complete."""
    man = {
        "stage": stage,
        "config": _normalise(config),
        "inputs": {str(p): input_hash(p) for p in inputs},
        "outputs": outputs or {},
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        man.update(_normalise(extra))
    save_json(Path(out_dir) / MANIFEST, man)
    return man


@contextlib.contextmanager
def staging_dir(out_dir) -> Iterator[Path]:
    """Build a whole stage folder under a temporary name and rename it into place on success.

    For stages that are not resumable: a crash leaves no trace under `out_dir`.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(out_dir.parent, f".{out_dir.name}.")
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tag_folder(tag: str) -> str:
    """The folder of a conditioning tag under train/, sample/, eval/, curve/: the tag with ':'
    written '-' (labels:coarse -> labels-coarse). The grammar that reads it back, and the one
    spelling of each tag, are cedm.conditioning's (conditioning.folder spells a tag first)."""
    return str(tag).replace(":", "-")


# Ablations (the paper's Tables 4 and 5; cedm.conditioning.ABLATIONS), and guided or filtered
# sample sets (cedm.sample.sampler_variant): a variant of one stage's result, kept beside it in
# the folder <name>@<variant>.
def ablation_folder(name: str, ablation: str | None) -> str:
    """The folder of a stage result: `name`, or `name@ablation` for an ablation of it."""
    return f"{name}@{ablation}" if ablation else name


def split_ablation(name: str) -> tuple[str, str | None]:
    """A folder name -> (its tag or name, its ablation or None)."""
    base, at, abl = str(name).partition("@")
    return (base, abl) if at else (base, None)


class RunDir:
    """The run directory layout: where each stage reads and writes (docs/method.md#pipeline).

    <root>/data/              images.npy [N,H,W,3] uint8, labels.npy [N] (when known)
    <root>/features/          features.npy [N,D] float32
    <root>/knn/               knn.npy [N,k] int64 (self excluded)
    <root>/cluster/<m>-C<C>/  assignments.npy [N], summary.json, head.safetensors (TEMI)
    <root>/bound/             table.json, r_c.png
    <root>/train/<tag>/       network.safetensors + network.json, state.pt, log.jsonl
    <root>/sample/<tag>/      images.npz (images, labels, seeds), grid.png
    <root>/eval/<tag>/        metrics.json
    <root>/curve/<tag>/       curve.json: FD of the training snapshots against Mimg
    <root>/report/            report.html, report.md
    A <tag> names the conditioning: '<method>-C<C>' (clusters), 'labels', or 'uncond'; a folder
    <name>@<ablation> holds an ablation of that result (cedm.conditioning.ABLATIONS).
    """

    def __init__(self, root):
        self.root = Path(root)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def knn(self) -> Path:
        return self.root / "knn"

    def cluster(self, method: str, clusters: int, ablation: str | None = None) -> Path:
        # = conditioning.cluster_dir of the tag <method>-C<C> (+ @ablation)
        return self.root / "cluster" / ablation_folder(f"{method}-C{clusters}", ablation)

    @property
    def bound(self) -> Path:
        return self.root / "bound"

    def train(self, tag: str) -> Path:
        return self.root / "train" / tag_folder(tag)

    def sample(self, tag: str, ablation: str | None = None) -> Path:
        return self.root / "sample" / ablation_folder(tag_folder(tag), ablation)

    def eval(self, tag: str, ablation: str | None = None) -> Path:
        return self.root / "eval" / ablation_folder(tag_folder(tag), ablation)

    def curve(self, tag: str) -> Path:
        return self.root / "curve" / tag_folder(tag)

    @property
    def report(self) -> Path:
        return self.root / "report"
