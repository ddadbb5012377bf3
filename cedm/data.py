"""`cedm data`: prepare an image collection as uint8 arrays in <run>/data (docs/method.md#pipeline).

Outputs (written in a staging folder and renamed into place, manifest last):
  images.npy [N,H,W,3] uint8, labels.npy [N] int64 (when known),
  coarse_labels.npy [N] int64 (CIFAR-100 only: the 20 super-classes), manifest.json with
  config {"dataset", "resolution", "num_classes", "split", "limit", "source", "heldout",
  "test_source", ...} and "num_test_images" (0: no held-out split); "resolution_from" {"images":
  the source's stamp} when the resolution was read from the images (a rerun reuses it while the
  stamp holds; docs/performance.md#data-rerun).
  A held-out split, never trained on (the 1-NN AUROC of `cedm evaluate`), where there is one:
  test_images.npy [M,H,W,3] uint8 at the same resolution, test_labels.npy and (CIFAR-100)
  test_coarse_labels.npy when labels are known. --limit caps the training images only; the
  held-out split is kept whole.

Sources:
  cifar10 / cifar100  the official python-version tarballs, downloaded from the official URL and
                      checked against the published MD5, or a local copy (--source FILE or URL).
                      Held out: the archive's test batch (10,000 images) when preparing the
                      train split; none for --split test.
  folder              a folder (searched recursively) or a .zip of images: RGB conversion of any
                      mode, shorter side resized to --resolution (Lanczos), center crop. An
                      NVlabs/edm dataset (dataset_tool.py's zip or folder) brings its labels:
                      dataset.json {"labels": [[file name, class], ...]} -> labels.npy.
                      Held out: the images of --test-source (folder or zip, prepared the same
                      way); without it, none.
  ffhq64, afhqv2-64   a folder/zip of FFHQ / AFHQv2 images (--source), prepared like `folder` at 64 px.
  digits              scikit-learn's 8x8 digits (shipped with the package, no download),
                      at the preset's resolution (8: native) as 3-channel uint8; labels kept.
                      Held out: every 10th image (index % 10 == 9): 1618 train, 179 test.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tarfile
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cedm import pipeline
from cedm.io import CedmError, RunDir, atomic_path, save_array

DATASETS = ("digits", "cifar10", "cifar100", "ffhq64", "afhqv2-64", "folder")
SOURCE_DATASETS = ("ffhq64", "afhqv2-64")   # presets with no official download: images via --source

# Official python-version tarballs and their published MD5 sums (https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR = {
    "cifar10": dict(url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                    md5="c58f30108f718f92721af3b95e74349a", folder="cifar-10-batches-py",
                    train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    meta="batches.meta", label_key=b"labels", names_key=b"label_names"),
    "cifar100": dict(url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                     md5="eb9058c3a382ffc7106e4002c42a8d85", folder="cifar-100-python",
                     train=["train"], test=["test"], meta="meta",
                     label_key=b"fine_labels", names_key=b"fine_label_names"),
}
# The fixed held-out part of digits: sklearn's images with index % DIGITS_HOLDOUT_EVERY ==
# DIGITS_HOLDOUT_EVERY - 1 (every 10th: 179 of 1797), never in images.npy.
DIGITS_HOLDOUT_EVERY = 10
HELDOUT_RULES = {"digits": "index % 10 == 9", "cifar": "test batch", "folder": "test_source"}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


def cache_dir() -> Path:
    """Where downloaded archives are kept: $CEDM_CACHE, else ~/.cache/cedm."""
    return Path(os.environ.get("CEDM_CACHE") or Path.home() / ".cache" / "cedm")


# ----------------------------------------------------------------------------------------------
# Download / checksum

def md5sum(path, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def download(url: str, dest, md5: str | None) -> Path:
    """Download `url` to `dest` atomically, verifying `md5` (None = no check) on the fly.

    A failed download or a checksum mismatch raises CedmError and leaves nothing at `dest`.
    """
    from tqdm import tqdm

    from cedm import hub

    dest = Path(dest)
    if url.split("://")[0].lower() in ("http", "https") and hub.offline(url):   # no minute-long timeout
        raise CedmError(f"could not download {url}: offline (no network, or CEDM_OFFLINE=1 set); "
                        f"pass --source with a local copy")
    with atomic_path(dest) as tmp:
        h = hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
                total = int(r.headers.get("Content-Length") or 0) or None
                with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}",
                          file=sys.stderr, disable=None) as bar:
                    while b := r.read(1 << 20):
                        f.write(b)
                        h.update(b)
                        bar.update(len(b))
        except OSError as e:  # URLError, HTTPError, timeouts are OSErrors
            raise CedmError(f"could not download {url}: {e}; pass --source with a local copy") from None
        if md5 and h.hexdigest() != md5.lower():
            raise CedmError(f"checksum mismatch for {url}: md5 {h.hexdigest()}, expected {md5} "
                            f"(truncated or corrupt download); nothing kept")
    return dest


def fetch_archive(dataset: str, source: str | None, md5: str | None) -> Path:
    """The local path of a CIFAR tarball: `source` (file or URL) or the official URL, MD5-checked.

    md5: None = the published MD5, '' or 'skip' = no check, else the expected hex digest.
    """
    spec = CIFAR[dataset]
    want = spec["md5"] if md5 is None else (None if md5 in ("", "skip") else md5)
    url = source if source and "://" in source else None
    if source and not url:
        path = Path(source)
        if not path.is_file():
            raise CedmError(f"--source {source}: no such file")
        if want and (got := md5sum(path)) != want.lower():
            raise CedmError(f"checksum mismatch for {path}: md5 {got}, expected {want} "
                            f"(truncated or corrupt archive; pass --md5 skip to accept it anyway)")
        return path
    url = url or spec["url"]
    dest = cache_dir() / Path(url.split("?")[0]).name
    if dest.is_file() and (not want or md5sum(dest) == want.lower()):
        return dest
    return download(url, dest, want)


# ----------------------------------------------------------------------------------------------
# CIFAR tarballs (pickled dicts of numpy arrays, the official python version)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a tarball can not run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name} in pickle")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", "numpy._core", 1) if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(f) -> dict:
    return _ArrayUnpickler(f, encoding="bytes").load()


def load_cifar(dataset: str, archive, split: str = "train") -> dict:
    """Read a CIFAR-10/100 python tarball: {"images" [N,32,32,3] uint8, "labels" [N], ...}.

    CIFAR-100 also returns "coarse_labels" [N] (20 super-classes) and "coarse_names".
    """
    return load_cifar_splits(dataset, archive, (split,))[split]


def load_cifar_splits(dataset: str, archive, splits=("train", "test")) -> dict:
    """{split: load_cifar's dict} for several splits, reading the tarball once."""
    spec = CIFAR[dataset]
    try:
        with tarfile.open(archive, "r:gz") as tar:
            names = {m.name: m for m in tar.getmembers()}

            def read(name):
                key = f"{spec['folder']}/{name}"
                if key not in names:
                    raise CedmError(f"{archive} is not a {dataset} python-version archive (no {key})")
                return _unpickle(tar.extractfile(names[key]))

            batches = {s: [read(n) for n in spec[s]] for s in splits}
            meta = read(spec["meta"])
    except (tarfile.TarError, EOFError, zlib.error, OSError, pickle.UnpicklingError, ValueError) as e:
        raise CedmError(f"corrupt or truncated archive {archive}: {e}") from None
    return {s: _cifar_arrays(dataset, archive, batches[s], meta) for s in splits}


def _cifar_arrays(dataset: str, archive, batches: list, meta: dict) -> dict:
    spec = CIFAR[dataset]
    try:
        data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for b in batches])
        images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)     # CHW rows -> NHWC
        out = {"images": np.ascontiguousarray(images),
               "labels": np.concatenate([np.asarray(b[spec["label_key"]], np.int64) for b in batches]),
               "names": [n.decode() for n in meta[spec["names_key"]]]}
        if dataset == "cifar100":
            out["coarse_labels"] = np.concatenate([np.asarray(b[b"coarse_labels"], np.int64) for b in batches])
            out["coarse_names"] = [n.decode() for n in meta[b"coarse_label_names"]]
    except (KeyError, ValueError, TypeError) as e:
        raise CedmError(f"corrupt archive {archive}: unexpected batch contents ({e})") from None
    if len(out["labels"]) != len(images):
        raise CedmError(f"corrupt archive {archive}: {len(images)} images but {len(out['labels'])} labels")
    return out


# ----------------------------------------------------------------------------------------------
# Image folders / zips

def _resize_crop(img, resolution: int):
    """RGB, shorter side -> resolution (Lanczos), center crop to resolution x resolution."""
    from PIL import Image

    if img.mode != "RGB":
        if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
            img = img.convert("RGBA")  # palette/alpha: composite on white, not on black
            bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, img)
        img = img.convert("RGB")
    w, h = img.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)), dtype=np.uint8)


def _image_entries(source: Path, flag: str = "--source"):
    """Sorted (name, opener) pairs for the images in a folder (recursive) or a zip."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        return [(str(p.relative_to(source)), (lambda p=p: open(p, "rb"))) for p in files], None
    if source.is_file() and zipfile.is_zipfile(source):
        zf = zipfile.ZipFile(source)
        names = sorted(n for n in zf.namelist()
                       if not n.endswith("/") and Path(n).suffix.lower() in IMAGE_EXTENSIONS)
        return [(n, (lambda n=n: zf.open(n))) for n in names], zf
    if source.is_file():
        raise CedmError(f"{flag} {source} is neither a folder nor a zip archive")
    raise CedmError(f"{flag} {source}: no such folder or file")


EDM_LABELS = "dataset.json"   # NVlabs/edm dataset_tool.py: {"labels": [[file name, class], ...] or null}


def _edm_labels(source: Path, zf) -> dict[str, int] | None:
    """file name -> class of an EDM-format dataset (a `dataset.json` at the root of the folder or
    zip, as EDM's dataset_tool writes it), or None where there is none or its labels are null."""
    import json

    try:
        if zf is not None:
            if EDM_LABELS not in zf.namelist():
                return None
            raw = zf.read(EDM_LABELS)
        elif (source / EDM_LABELS).is_file():
            raw = (source / EDM_LABELS).read_bytes()
        else:
            return None
        labels = json.loads(raw).get("labels")
    except (ValueError, AttributeError) as e:
        raise CedmError(f"{source}/{EDM_LABELS} is not EDM's dataset.json ({{\"labels\": [[name, class], ...]}}): "
                        f"{e}") from None
    if labels is None:
        return None
    try:
        out = {str(name).replace("\\", "/"): int(c) for name, c in labels}
    except (TypeError, ValueError):
        raise CedmError(f"{source}/{EDM_LABELS}: labels must be a list of [file name, integer class] "
                        f"pairs") from None
    if any(c < 0 for c in out.values()):
        raise CedmError(f"{source}/{EDM_LABELS}: class ids must be non-negative")
    return out


def folder_resolution(source, limit: int | None = None) -> int:
    """The resolution of a folder / zip whose images are all square and of one size (an EDM
    dataset_tool.py zip is, by construction): read from the image headers, and said. Images of
    several sizes, or not square, need --resolution: a one-line error naming the sizes found."""
    from PIL import Image
    from tqdm import tqdm

    source = Path(source)
    entries, zf = _image_entries(source)
    sizes: dict[tuple[int, int], str] = {}
    try:
        for name, opener in tqdm(entries[:limit] if limit else entries, desc="image sizes", file=sys.stderr,
                                 disable=None):
            try:
                with opener() as f, Image.open(f) as img:          # the header only, no decoding
                    sizes.setdefault(img.size, name)
            except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError):
                continue                                          # load_folder names unreadable files
            if len(sizes) > 1:
                break
    finally:
        if zf is not None:
            zf.close()
    if not sizes:
        raise CedmError(f"--source {source} holds no readable images ({', '.join(IMAGE_EXTENSIONS)})")
    if len(sizes) > 1:
        (a, na), (b, nb) = list(sizes.items())[:2]
        raise CedmError(f"--source {source}: the images differ in size ({na} is {a[0]}x{a[1]}, {nb} is {b[0]}x{b[1]}); "
                        f"pass --resolution N (shorter side resized to N, centre crop)")
    (w, h), name = next(iter(sizes.items()))
    if w != h:
        raise CedmError(f"--source {source}: the images are {w}x{h}, not square; pass --resolution N (shorter side "
                        f"resized to N, centre crop)")
    print(f"cedm data: resolution {w} from the images (all {w}x{h}; --resolution overrides)", file=sys.stderr)
    return w


def source_stamp(source) -> str:
    """A cheap stamp of an image source: a zip's size, mtime and `pipeline.fingerprint` (1 MiB
    read at most); a folder's image files' names, sizes and mtimes (one stat each). Changes when
    the images may have: then `folder_resolution` reads the headers again (`_resolution_of`)."""
    source = Path(source)
    h = hashlib.sha256()
    if source.is_dir():
        for top, dirs, names in os.walk(source):
            dirs.sort()
            for name in sorted(names):
                if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    st = os.stat(os.path.join(top, name))
                    h.update(f"{os.path.relpath(os.path.join(top, name), source)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = source.stat()
        h.update(f"{st.st_size}\0{st.st_mtime_ns}\0{pipeline.fingerprint(source)[1]}".encode())
    return h.hexdigest()[:32]


RESOLUTION_FROM = "resolution_from"    # manifest: {"images": the source's stamp} when read from the images


def _resolution_of(out_dir: Path, config: dict, source, limit: int | None) -> tuple[int, str]:
    """(resolution, source_stamp) of the source: `folder_resolution`, or the finished result's own
    when it read it from the same source, unchanged since (`source_stamp`), for the same config:
    a rerun (every sweep rerun, every Argo data step) then decides its skip without reading every
    image header again (70k for FFHQ). The stamp is taken before the headers are read."""
    stamp = source_stamp(source) if Path(source).exists() else ""
    old = pipeline.finished_manifest(out_dir) or {}
    oldc = dict(old.get("config") or {})
    res = oldc.pop("resolution", None)
    same = oldc == {k: v for k, v in pipeline.normalise(config).items() if k != "resolution"}
    if stamp and same and isinstance(res, int) and (old.get(RESOLUTION_FROM) or {}).get("images") == stamp:
        print(f"cedm data: resolution {res} as the finished result read it from the images (the source is "
              f"unchanged; --resolution overrides)", file=sys.stderr)
        return res, stamp
    return folder_resolution(source, limit), stamp


# Images decoded per block before they are written out (docs/performance.md#data-memory).
CHUNK_BYTES = 32 << 20


def load_folder(source, resolution: int, limit: int | None = None, skip_unreadable: bool = False,
                flag: str = "--source", out=None) -> dict:
    """Images of a folder or zip, resized and center-cropped: {"images" [N,R,R,3] uint8, "skipped"},
    and "labels" [N] int64 when it is an EDM-format dataset with labels (dataset.json).

    Unreadable files are an error naming them, unless `skip_unreadable` (then a warning).
    `flag`: the option that named `source`, for the messages (--source, --test-source).
    out: an .npy path; the images are then written there block by block (CHUNK_BYTES at a time,
    atomically: cedm.io.npy_rows) and "images" is its read-only memory map, so the whole
    dataset is never in memory (docs/performance.md#data-memory). A failure leaves nothing there.
    """
    from PIL import Image
    from tqdm import tqdm

    from cedm.io import load_array, npy_rows

    source = Path(source)
    entries, zf = _image_entries(source, flag)
    try:
        if limit is not None:
            entries = entries[:limit]
        if not entries:
            raise CedmError(f"{flag} {source} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        edm = _edm_labels(source, zf)
        if edm is not None:
            missing = [name for name, _ in entries if name not in edm]
            if missing:
                raise CedmError(f"{source}/{EDM_LABELS} has no label for {len(missing)} image(s), e.g. "
                                f"{', '.join(missing[:3])}")
        row = (resolution, resolution, 3)
        kept: list[str] = []
        bad: list = []

        def decoded():
            for name, opener in tqdm(entries, desc="images", file=sys.stderr, disable=None):
                try:
                    with opener() as f, Image.open(f) as img:
                        img.load()
                        arr = _resize_crop(img, resolution)
                except (OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
                    bad.append((name, e))
                    continue
                kept.append(name)
                yield arr

        if out is None:                               # in memory: one [N,R,R,3] array
            images = np.empty((len(entries),) + row, np.uint8)
            n = 0
            for arr in decoded():
                images[n] = arr
                n += 1
            images = images[:n]
            _check_unreadable(bad, n, skip_unreadable, flag, source)
        else:                                         # block by block into `out`
            block = np.empty((min(len(entries), max(1, CHUNK_BYTES // int(np.prod(row)))),) + row, np.uint8)
            with npy_rows(out, row, np.uint8) as w:
                b = 0
                for arr in decoded():
                    block[b] = arr
                    b += 1
                    if b == len(block):
                        w.write(block)
                        b = 0
                w.write(block[:b])
                _check_unreadable(bad, w.rows, skip_unreadable, flag, source)   # before the rename
            images = load_array(out, mmap=True)
    except zipfile.BadZipFile as e:
        raise CedmError(f"corrupt zip archive {source}: {e}") from None
    finally:
        if zf is not None:
            zf.close()
    res = {"images": images, "skipped": [name for name, _ in bad]}
    if edm is not None:
        res["labels"] = np.array([edm[name] for name in kept], dtype=np.int64)
    return res


def _check_unreadable(bad: list, n: int, skip_unreadable: bool, flag: str, source) -> None:
    """Unreadable files: an error listing them (unless skip_unreadable: a warning); none readable: an error."""
    if bad:
        listed = ", ".join(name for name, _ in bad[:20]) + (f" and {len(bad) - 20} more" if len(bad) > 20 else "")
        if not skip_unreadable:
            raise CedmError(f"{len(bad)} unreadable image file(s) in {flag} {source}: {listed} "
                            f"(first error: {bad[0][1]}); pass --skip-unreadable to leave them out")
        print(f"cedm data: warning: skipped {len(bad)} unreadable file(s): {listed}", file=sys.stderr)
    if n == 0:
        raise CedmError(f"{flag} {source}: no readable images")


# ----------------------------------------------------------------------------------------------
# scikit-learn digits

def load_digits(resolution: int = 8, split: str = "train") -> dict:
    """scikit-learn's 8x8 digits (values 0..16) as [N,R,R,3] uint8 (bicubic resampling to R), labels.

    split: "train" (1618 images), "test" (the fixed held-out part, 179 images: sklearn's
    index % 10 == 9, every 10th image; never trained on) or "all" (the 1797, in sklearn's order).
    "source_index" [N]: each image's index in sklearn's digits.
    """
    from PIL import Image
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    index = np.arange(len(d.images))
    held = index % DIGITS_HOLDOUT_EVERY == DIGITS_HOLDOUT_EVERY - 1
    keep = {"train": ~held, "test": held, "all": np.ones_like(held)}.get(split)
    if keep is None:
        raise CedmError(f"digits split must be train, test or all, got {split!r}")
    index = index[keep]
    grey = np.round(d.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)      # [N,8,8]
    if resolution != grey.shape[1]:
        grey = np.stack([np.asarray(Image.fromarray(g).resize((resolution, resolution), Image.Resampling.BICUBIC))
                         for g in grey])
    images = np.repeat(grey[..., None], 3, axis=-1)
    return {"images": np.ascontiguousarray(images), "labels": d.target[index].astype(np.int64),
            "names": [str(i) for i in range(10)], "source_index": index}


def _resize_array(images: np.ndarray, resolution: int) -> np.ndarray:
    from PIL import Image

    if images.shape[1] == resolution and images.shape[2] == resolution:
        return images
    return np.stack([_resize_crop(Image.fromarray(im), resolution) for im in images])


# ----------------------------------------------------------------------------------------------
# Stage

def run(run_dir, dataset: str, source: str | None = None, resolution: int | None = None,
        limit: int | None = None, split: str = "train", md5: str | None = None,
        skip_unreadable: bool = False, force: bool = False, pushgateway=None,
        test_source: str | None = None) -> dict:
    """Prepare `dataset` into <run_dir>/data. Skips when done with the same config.

    Also a held-out split (test_images.npy, ...) where the dataset has one: digits' every 10th
    image, CIFAR's test batch (train split only), the images of `test_source` (folder presets).
    Returns {"config": the manifest config, "num_images": N or None when skipped, "skipped": bool}.
    """
    from cedm.config import PRESETS

    if dataset not in DATASETS:
        raise CedmError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if resolution is not None and resolution < 1:
        raise CedmError(f"--resolution must be positive, got {resolution}")
    if limit is not None and limit < 1:
        raise CedmError(f"--limit must be at least 1, got {limit} (an empty dataset)")
    if split not in ("train", "test"):
        raise CedmError(f"--split must be train or test, got {split!r}")
    if dataset == "digits" and source:
        raise CedmError("--source is not used with --dataset digits (it ships with scikit-learn)")
    if dataset in ("folder", *SOURCE_DATASETS) and not source:
        raise CedmError(f"--dataset {dataset} needs --source (a folder or .zip of images)")
    if dataset not in CIFAR and split != "train":
        raise CedmError("--split applies to cifar10/cifar100 only")
    test_source = test_source or None    # "" (an empty workflow parameter): none
    if test_source is not None:
        if dataset not in ("folder", *SOURCE_DATASETS):
            raise CedmError(f"--test-source applies to folder, ffhq64 and afhqv2-64 only ({dataset} "
                            f"{'holds out every 10th image' if dataset == 'digits' else 'holds out its test batch'})")
        _, zf = _image_entries(Path(test_source), "--test-source")   # a bad one fails before any work
        if zf is not None:
            zf.close()

    num_classes = {"digits": 10, "cifar10": 10, "cifar100": 100}.get(dataset)
    # The held-out rule is part of the identity: digits' rule decides which images are trained on,
    # and a run prepared before there was a held-out split is another result.
    if dataset == "digits":
        heldout = HELDOUT_RULES["digits"]
    elif dataset in CIFAR:
        heldout = HELDOUT_RULES["cifar"] if split == "train" else None
    else:
        heldout = HELDOUT_RULES["folder"] if test_source is not None else None
    from_images = resolution is None and dataset == "folder"   # the images' own size, read from them
    if resolution is None and not from_images:
        resolution = PRESETS[dataset].resolution
    config = {"dataset": dataset, "resolution": None if resolution is None else int(resolution), "num_classes": num_classes,
              "split": split, "limit": limit, "source": str(source) if source else None,
              "skip_unreadable": bool(skip_unreadable), "heldout": heldout,
              "test_source": str(test_source) if test_source is not None else None}
    if dataset == "cifar100":
        config["num_coarse_classes"] = 20
    rd = RunDir(run_dir)
    out_dir = rd.data
    stamp = None
    if from_images:
        resolution, stamp = _resolution_of(out_dir, config, source, limit)
        config["resolution"] = int(resolution)

    def compute(work, _):
        extra, test, written = {}, None, set()      # written: files already in `work` (block by block)
        if dataset == "digits":
            d = load_digits(resolution, "train")
            test = load_digits(resolution, "test")
        elif dataset in CIFAR:
            archive = fetch_archive(dataset, source, md5)
            parts = load_cifar_splits(dataset, archive, (split, "test") if heldout else (split,))
            d, test = parts[split], (parts["test"] if heldout else None)
            if limit is not None:
                d = {k: (v[:limit] if isinstance(v, np.ndarray) else v) for k, v in d.items()}
            d["images"] = _resize_array(d["images"], resolution)
            if test is not None:
                test["images"] = _resize_array(test["images"], resolution)
            extra["archive_md5"] = md5sum(archive)
        else:
            if test_source is not None:      # first: a bad held-out source fails before the long part
                test = load_folder(test_source, resolution, None, skip_unreadable, flag="--test-source",
                                   out=work / "test_images.npy")
                extra["test_skipped"] = test["skipped"]
                written.add("test_images")
            d = load_folder(source, resolution, limit, skip_unreadable, out=work / "images.npy")
            written.add("images")
            extra["skipped"] = d["skipped"]
            if "labels" in d:                # an EDM-format dataset: its labels -> labels.npy
                extra["labels_from"] = EDM_LABELS
                extra["num_label_classes"] = int(len(np.unique(d["labels"])))
        if limit is not None:
            d = {k: (v[:limit] if isinstance(v, np.ndarray) else v) for k, v in d.items()}
        n = len(d["images"])
        if n == 0:
            raise CedmError(f"dataset {dataset} is empty; nothing written")
        if "names" in d:
            extra["class_names"] = d["names"]
        if "coarse_names" in d:
            extra["coarse_class_names"] = d["coarse_names"]
        if "images" not in written:
            save_array(work / "images.npy", d["images"])
        outputs = {"images": "images.npy"}
        for key in ("labels", "coarse_labels"):
            if key in d:
                save_array(work / f"{key}.npy", d[key])
                outputs[key] = f"{key}.npy"
        n_test = 0
        if test is not None:                 # the held-out split, kept whole (not --limit'ed)
            n_test = len(test["images"])
            for key in ("images", "labels", "coarse_labels"):
                if key in test:
                    if f"test_{key}" not in written:
                        save_array(work / f"test_{key}.npy", test[key])
                    outputs[f"test_{key}"] = f"test_{key}.npy"
        extra["num_test_images"] = n_test
        print(f"cedm data: {dataset}: {n} images {resolution}x{resolution}"
              + (f", {num_classes} classes" if num_classes else "")
              + (f", labels from {EDM_LABELS} ({extra['num_label_classes']} classes)" if "labels_from" in extra else "")
              + (f", {n_test} held out" if n_test else ", no held-out split") + f" -> {out_dir}", file=sys.stderr)
        if stamp:
            extra[RESOLUTION_FROM] = {"images": stamp}
        return pipeline.Output(outputs, {"num_images": n, "shape": list(d["images"].shape), **extra}, value=n)

    res = pipeline.execute(pipeline.Stage("data", out_dir, rd.root, config), compute, force=force,
                           pushgateway=pushgateway)
    return {"config": config, "num_images": res.value, "skipped": res.skipped}


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare a dataset (uint8 images + labels) in the run directory",
                       description=__doc__.split("\n\n")[0] + " CIFAR tarballs are MD5-checked; "
                       "folders/zips are resized (shorter side) and center-cropped.")
    pipeline.add_common(p, starts_run=True)
    p.add_argument("--dataset", required=True, choices=DATASETS,
                   help="digits (built in), cifar10, cifar100 (official tarballs), ffhq64, afhqv2-64 or folder "
                        "(a folder or .zip of images given by --source)")
    p.add_argument("--source", default=None, metavar="PATH_OR_URL",
                   help="CIFAR: a local tarball or a URL (default: the official URL, cached in "
                        "$CEDM_CACHE or ~/.cache/cedm); folder/ffhq64/afhqv2-64: the image folder or .zip")
    p.add_argument("--resolution", type=int, default=None, metavar="N",
                   help="output resolution in pixels (default: the dataset preset's: digits 8, "
                        "cifar 32, ffhq64/afhqv2-64 64; folder: the images' own when all are square and of one "
                        "size, as in an EDM dataset_tool.py zip, else required)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="keep only the first N training images (default: all; the held-out split "
                        "is kept whole)")
    p.add_argument("--split", default="train", choices=("train", "test"),
                   help="CIFAR split to prepare (default: %(default)s)")
    p.add_argument("--md5", default=None, metavar="HEX",
                   help="expected MD5 of the CIFAR tarball (default: the published one; "
                        "'skip' disables the check)")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="folder/zip: leave unreadable image files out with a warning listing them "
                        "(default: they are an error that lists them); also for --test-source")
    p.add_argument("--test-source", default=None, metavar="PATH",
                   help="folder/ffhq64/afhqv2-64: a folder or .zip of held-out images (never trained on; "
                        "the 1-NN AUROC of `cedm evaluate`), prepared like --source and kept whole. "
                        "Without it these datasets have no held-out split. digits always holds out "
                        "every 10th image, CIFAR its test batch (train split)")
    p.set_defaults(func=_main)


def _main(args) -> int:
    with pipeline.reporting("data", args.pushgateway, run_dir=args.run_dir):
        run(args.run_dir, args.dataset, source=args.source, resolution=args.resolution,
            limit=args.limit, split=args.split, md5=args.md5,
            skip_unreadable=args.skip_unreadable, force=args.force, test_source=args.test_source)
    return 0
