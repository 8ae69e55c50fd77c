"""Data sources: ``load_split(cfg, split)`` for every ``data.name`` the project knows.

``cfg`` is the ``data`` section of the experiment config, used duck-typed (attributes
``name``, ``root``, ``subset``, ``test_subset``, ``image_size``, ``download``,
``image_column``, ``label_column``; the optional ones may be missing).

Sources and where they read from (``data.root`` overrides every default):

============== =====================================================================
fashion-mnist  the idx ``.gz`` files of the Debian package ``dataset-fashion-mnist``:
               ``data.root``, else ``$PCL_RAY_FMNIST_DIR``, else
               ``/usr/share/datasets/fashion-mnist``. In memory, 1×28×28.
digits         scikit-learn's bundled ``load_digits`` (1,797 8×8 images, values
               0..16 scaled to 0..255). Fixed split: the first 1,500 images are
               ``train``, the remaining 297 ``test``. In memory, 1×8×8.
cifar10/100    torchvision's on-disk layout (``cifar-10-batches-py`` /
               ``cifar-100-python``) under ``data.root``, else ``$PCL_RAY_DATA_DIR``,
               else ``~/.cache/pcl_ray/datasets``; ``data.download`` fetches it.
               In memory, 3×32×32 (CIFAR-100: fine labels).
stl10          torchvision's ``stl10_binary`` layout, same roots; ``train`` is the
               5,000 labelled training images, ``test`` the 8,000 test images.
               In memory, 3×96×96.
imagefolder    ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``
               (``test`` reads ``root/test`` when it exists, else ``root/val``).
               Lazy: each image is decoded on access, converted to RGB, resized
               (shorter side) and centre-cropped to ``data.image_size`` (224 when None).
parquet        Parquet shards with an encoded-image column (``data.image_column``:
               PNG/JPEG bytes, or a struct with a ``bytes`` field as Hugging Face
               ``datasets`` writes it) and an optional integer label column
               (``data.label_column``). For split ``s`` (``test`` also tries ``val``
               and ``validation``): every ``*.parquet`` in ``root/s/``, else the
               files ``root/s*.parquet``; ``root`` may also be a single file, used
               as the training split. In memory when all images share one size,
               else lazy like imagefolder.
============== =====================================================================

Every problem with the files is a one-line :class:`~pcl_ray.data.errors.DataError` (a ConfigError)
naming the config key or the file; lazily decoded splits are checked by decoding a small seeded sample
of their images when they load (:func:`pcl_ray.data.checks.check_decodes`). ``data.skip_bad_images``
(when the config has it) replaces an image that fails later with the next one that decodes.

After loading, ``data.subset`` keeps the first N training images and ``data.test_subset``
the first N test images; then in-memory splits are resized to ``data.image_size`` when it
is set (shorter side + centre crop, antialiased), so every split yields
``image_size×image_size`` images (native size when None).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .dataset import (
    BytesDecoder,
    FileDecoder,
    IndexedImages,
    channel_stats,
)
from .checks import check_decodes
from .errors import DataError, DataNotFoundError, reason
from .idx import read_idx

__all__ = [
    "load_split",
    "DATA_SOURCES",
    "DEFAULT_FMNIST_DIR",
    "DEFAULT_LAZY_IMAGE_SIZE",
    "DIGITS_TRAIN_SIZE",
    "load_fashion_mnist",
    "load_digits_split",
    "load_cifar",
    "load_stl10",
    "load_imagefolder",
    "load_parquet",
]

SPLITS = ("train", "test")
DEFAULT_FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_ENV = "PCL_RAY_FMNIST_DIR"
DATA_DIR_ENV = "PCL_RAY_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/pcl_ray/datasets"
#: Load size of lazily decoded sources (imagefolder, mixed-size parquet) when data.image_size is None.
DEFAULT_LAZY_IMAGE_SIZE = 224
#: The digits set's first DIGITS_TRAIN_SIZE images are the training split, the rest the test split.
DIGITS_TRAIN_SIZE = 1500

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
STL10_MEAN, STL10_STD = (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

FMNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


def _opt(cfg: Any, name: str, default: Any = None) -> Any:
    """An optional config attribute (duck-typed configs may leave it out)."""
    value = getattr(cfg, name, default)
    return default if value is None else value


def _in_memory(
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray,
    num_classes: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    name: str,
    split: str,
    classes: Any = None,
) -> IndexedImages:
    tensor = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
    return IndexedImages(
        tensor=tensor.to(torch.uint8).contiguous(),
        labels=np.asarray(labels, dtype=np.int64),
        num_classes=num_classes,
        mean=mean,
        std=std,
        name=name,
        split=split,
        classes=classes,
    )


# --------------------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)
# --------------------------------------------------------------------------------------


def _fmnist_dir(cfg: Any) -> Path:
    return Path(_opt(cfg, "root") or os.environ.get(FMNIST_ENV) or DEFAULT_FMNIST_DIR).expanduser()


def _find_idx(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise DataNotFoundError(
        f"Fashion-MNIST file {stem}.gz not found in {directory}. Install the offline data set with "
        f"`apt-get install dataset-fashion-mnist` (files land in {DEFAULT_FMNIST_DIR}), or point "
        f"data.root (or ${FMNIST_ENV}) at a directory holding the four idx .gz files"
    )


def load_fashion_mnist(cfg: Any, split: str) -> IndexedImages:
    """Fashion-MNIST from the standard idx files: 60,000 train / 10,000 test, 1×28×28."""
    directory = _fmnist_dir(cfg)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(directory, f"{prefix}-images-idx3-ubyte"), expect_ndim=3)
    labels = read_idx(_find_idx(directory, f"{prefix}-labels-idx1-ubyte"), expect_ndim=1)
    if images.dtype != np.uint8 or len(images) != len(labels):
        raise DataError(
            f"Fashion-MNIST files in {directory} disagree: {images.shape} {images.dtype} images, {labels.shape} labels"
        )
    return _in_memory(
        images[:, None], labels, 10, FMNIST_MEAN, FMNIST_STD, "fashion-mnist", split, FMNIST_CLASSES
    )


# --------------------------------------------------------------------------------------
# scikit-learn digits (tiny, for tests)
# --------------------------------------------------------------------------------------


def load_digits_split(cfg: Any, split: str) -> IndexedImages:
    """scikit-learn's 8×8 digits; the first 1,500 images train, the remaining 297 test.

    Pixel values 0..16 are scaled to 0..255. Mean/std come from the training part for
    both splits.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]
    labels = bunch.target.astype(np.int64)
    mean, std = channel_stats(torch.from_numpy(images[:DIGITS_TRAIN_SIZE]))
    part = slice(0, DIGITS_TRAIN_SIZE) if split == "train" else slice(DIGITS_TRAIN_SIZE, None)
    classes = [str(c) for c in bunch.target_names]
    return _in_memory(images[part], labels[part], 10, mean, std, "digits", split, classes)


# --------------------------------------------------------------------------------------
# torchvision sets: CIFAR-10/100, STL-10
# --------------------------------------------------------------------------------------


def _torchvision_root(cfg: Any) -> Path:
    return Path(_opt(cfg, "root") or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def _open_torchvision(name: str, factory: Callable[..., Any], root: Path, download: bool, **kwargs: Any) -> Any:
    try:
        return factory(root=str(root), download=download, **kwargs)
    except Exception as err:
        if download:
            raise DataError(f"data.download: fetching {name} into {root} failed ({reason(err)})") from None
        if not isinstance(err, (RuntimeError, OSError)):
            raise DataError(f"data.root: the {name} files under {root} do not load ({reason(err)})") from None
        raise DataNotFoundError(
            f"{name} not found (or corrupted) under {root}: {reason(err)}. Set data.download=true to fetch it, "
            f"or point data.root at the directory that holds torchvision's extracted files"
        ) from None


def load_cifar(cfg: Any, split: str, *, num_classes: int) -> IndexedImages:
    """CIFAR-10 (``num_classes=10``) or CIFAR-100 (fine labels) through torchvision, 3×32×32."""
    from torchvision import datasets

    name = f"cifar{num_classes}"
    factory = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
    root = _torchvision_root(cfg)
    ds = _open_torchvision(name, factory, root, bool(_opt(cfg, "download", False)), train=split == "train")
    images = np.asarray(ds.data, dtype=np.uint8).transpose(0, 3, 1, 2)  # N×H×W×C → N×C×H×W
    mean, std = (CIFAR10_MEAN, CIFAR10_STD) if num_classes == 10 else (CIFAR100_MEAN, CIFAR100_STD)
    return _in_memory(images, np.asarray(ds.targets), num_classes, mean, std, name, split, ds.classes)


def load_stl10(cfg: Any, split: str) -> IndexedImages:
    """STL-10 through torchvision: the 5,000 labelled ``train`` or 8,000 ``test`` images, 3×96×96."""
    from torchvision import datasets

    root = _torchvision_root(cfg)
    ds = _open_torchvision("stl10", datasets.STL10, root, bool(_opt(cfg, "download", False)), split=split)
    images = np.asarray(ds.data, dtype=np.uint8)  # already N×C×H×W
    classes = getattr(ds, "classes", None)
    return _in_memory(images, np.asarray(ds.labels), 10, STL10_MEAN, STL10_STD, "stl10", split, classes)


# --------------------------------------------------------------------------------------
# ImageFolder (ImageNet layout), lazy
# --------------------------------------------------------------------------------------


def _skip_bad(cfg: Any) -> bool:
    """``data.skip_bad_images``: replace images that fail to decode during training instead of stopping."""
    return bool(getattr(cfg, "skip_bad_images", False))


def _required_root(cfg: Any) -> Path:
    root = _opt(cfg, "root")
    if root is None:
        raise DataError(f"data.root: required for data.name={cfg.name!r} (the folder or file holding the data set)")
    return Path(root).expanduser()


#: headers read to find an ImageFolder's native size (data.image_size None)
SIZE_SAMPLE = 256


def native_size(paths: list[str], where: Any) -> int:
    """The side the images of ``paths`` share (headers of a seeded sample of :data:`SIZE_SAMPLE`), the
    shorter side when they are all the same non-square size, else :data:`DEFAULT_LAZY_IMAGE_SIZE`. Says which."""
    from .checks import sample_indices

    sizes = set()
    for i in sample_indices(len(paths), SIZE_SAMPLE):
        try:
            with Image.open(paths[i]) as img:
                sizes.add(img.size)
        except Exception:  # a bad file is reported by check_decodes, with its name
            continue
    if len(sizes) == 1:
        w, h = next(iter(sizes))
        _note(f"data.image_size unset: training at the images' native {min(w, h)}x{min(w, h)} ({where})")
        return min(w, h)
    _note(f"data.image_size unset and the images of {where} differ in size: training at "
          f"{DEFAULT_LAZY_IMAGE_SIZE}x{DEFAULT_LAZY_IMAGE_SIZE}")
    return DEFAULT_LAZY_IMAGE_SIZE


_NOTED: set[str] = set()


def _note(message: str) -> None:
    """Print ``message`` once per process."""
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"[pcl-ray] {message}", flush=True)


def load_imagefolder(cfg: Any, split: str) -> IndexedImages:
    """``root/<split>/<class>/<image>`` decoded lazily to RGB ``image_size×image_size``."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = _required_root(cfg)
    candidates = ["train"] if split == "train" else ["test", "val"]
    if not root.is_dir():
        raise DataNotFoundError(f"data.root: {root} is not a folder (imagefolder expects "
                                f"{root}/train/<class>/<image> and {root}/val/<class>/<image>)")
    split_dir = next((root / c for c in candidates if (root / c).is_dir()), None)
    if split_dir is None:
        raise DataNotFoundError(
            f"data.root: imagefolder has no {' or '.join(f'{c}/' for c in candidates)} folder under {root} "
            f"(expected {root}/{candidates[-1]}/<class>/<image>)"
        )
    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:  # no class folders, or class folders without images
        raise DataError(f"data.root: imagefolder split {split_dir} holds no images in <class>/ folders "
                        f"({reason(exc)})") from None
    paths = [path for path, _ in samples]
    size = _opt(cfg, "image_size") or native_size(paths, split_dir)
    labels = np.array([label for _, label in samples], dtype=np.int64)
    return IndexedImages(
        decoder=FileDecoder(paths, size, channels=3, skip_bad=_skip_bad(cfg)),
        labels=labels,
        num_classes=len(classes),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name="imagefolder",
        split=split,
        classes=classes,
    )


# --------------------------------------------------------------------------------------
# Parquet shards (image bytes + label), read with pyarrow
# --------------------------------------------------------------------------------------

_PARQUET_SPLIT_NAMES = {"train": ("train",), "test": ("test", "val", "validation")}


def _parquet_files(root: Path, split: str) -> list[Path]:
    if root.is_file():
        if split == "train":
            return [root]
        raise DataNotFoundError(
            f"data.root: parquet {root} is a single file, used as the training split only; "
            f"for a test split use a directory with test*.parquet files or a test/ subdirectory"
        )
    if not root.is_dir():
        raise DataNotFoundError(f"data.root: {root} does not exist (parquet expects a folder of *.parquet "
                                "shards or one .parquet file)")
    for name in _PARQUET_SPLIT_NAMES[split]:
        if (root / name).is_dir():
            files = sorted((root / name).glob("*.parquet"))
        else:
            files = sorted(root.glob(f"{name}*.parquet"))
        if files:
            return files
    patterns = ", ".join(f"{root}/{n}/*.parquet or {root}/{n}*.parquet" for n in _PARQUET_SPLIT_NAMES[split])
    raise DataNotFoundError(f"data.root: parquet has no files for split {split!r}; looked for {patterns}")


def _image_bytes(column: Any, name: str, path: Path) -> list[Any]:
    import pyarrow as pa

    if pa.types.is_struct(column.type):
        if column.type.get_field_index("bytes") < 0:
            raise DataError(f"data.image_column: struct column {name!r} of {path} has no 'bytes' field")
        field_type = column.type.field(column.type.get_field_index("bytes")).type
        column = pa.chunked_array([chunk.field("bytes") for chunk in column.chunks], type=field_type)
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        raise DataError(f"data.image_column: column {name!r} of {path} has type {column.type}, expected encoded "
                        "image bytes (PNG/JPEG)")
    return column.to_pylist()


def _parquet_labels(column: Any, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa

    if not pa.types.is_integer(column.type):
        raise DataError(
            f"data.label_column: column {name!r} of {path} has type {column.type}; integer class ids are required "
            f"(map names to ids when writing the shards so that train and test agree)"
        )
    values = np.array([-1 if v is None else v for v in column.to_pylist()], dtype=np.int64)
    if (values < -1).any():
        raise DataError(f"data.label_column: column {name!r} of {path} has negative class ids "
                        f"(e.g. {int(values.min())}); use 0..C-1, or null where unknown")
    return values


def _read_shard(path: Path, image_col: str, label_col: str) -> tuple[list[Any], np.ndarray]:
    """Image bytes and labels (-1 where unknown) of one Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable Parquet file ({reason(exc)})") from None
    if image_col not in names:
        raise DataError(f"data.image_column: {path} has no column {image_col!r}; columns: {names}")
    has_label = bool(label_col) and label_col in names
    try:
        table = pq.read_table(path, columns=[image_col, label_col] if has_label else [image_col])
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: the Parquet data does not read ({reason(exc)})") from None
    blobs = _image_bytes(table.column(image_col), image_col, path)
    missing = [i for i, b in enumerate(blobs) if b is None]
    if missing:
        raise DataError(f"data.image_column: {path} has {len(missing)} row(s) with no image bytes in column "
                        f"{image_col!r} (first: row {missing[0]})")
    if has_label:
        labels = _parquet_labels(table.column(label_col), label_col, path)
    else:
        labels = np.full(table.num_rows, -1, np.int64)
    return blobs, labels


def load_parquet(cfg: Any, split: str) -> IndexedImages:
    """Parquet shards; in memory when every image has the same size, else lazy."""
    root = _required_root(cfg)
    image_col = _opt(cfg, "image_column", "image")
    label_col = _opt(cfg, "label_column", "label")
    blobs: list[bytes] = []
    labels: list[np.ndarray] = []
    origins: list[tuple[str, int]] = []
    for path in _parquet_files(root, split):
        shard_blobs, shard_labels = _read_shard(path, image_col, label_col)
        origins.append((str(path), len(blobs)))
        blobs.extend(shard_blobs)
        labels.append(shard_labels)
    label_arr = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    num_classes = int(label_arr.max()) + 1 if (label_arr >= 0).any() else 0
    names = BytesDecoder(blobs, 1, 1, origins=origins)  # names rows in messages

    # Headers only: sizes and modes decide between one in-memory tensor and lazy decoding.
    sizes, modes = set(), set()
    for i, blob in enumerate(blobs):
        try:
            with Image.open(io.BytesIO(blob)) as img:
                sizes.add(img.size)
                modes.add(img.mode)
        except Exception as exc:
            raise names.bad_image(i, exc) from None
    channels = 1 if modes <= {"L", "1", "I", "I;16", "F"} else 3
    if len(sizes) <= 1:
        # One size: decode everything now (non-square images are centre-cropped to a square;
        # load_split resizes to data.image_size afterwards). A bad image fails here, skip_bad or not:
        # nothing is lost by asking for a clean file before training starts.
        w, h = next(iter(sizes)) if sizes else (1, 1)
        decoder = BytesDecoder(blobs, min(w, h), channels, eval_view=False, origins=origins)
        tensor = torch.empty((len(blobs), channels, decoder.size, decoder.size), dtype=torch.uint8)
        for i in range(len(blobs)):
            tensor[i] = decoder[i]
        mean, std = channel_stats(tensor)
        return IndexedImages(
            tensor=tensor, labels=label_arr, num_classes=num_classes, mean=mean, std=std, name="parquet", split=split
        )
    size = _opt(cfg, "image_size")
    if size is None:
        size = DEFAULT_LAZY_IMAGE_SIZE
        _note(f"data.image_size unset and the images of {root} differ in size: training at {size}x{size}")
    return IndexedImages(
        decoder=BytesDecoder(blobs, int(size), channels, skip_bad=_skip_bad(cfg), origins=origins),
        labels=label_arr,
        num_classes=num_classes,
        mean=(0.5,) * channels,
        std=(0.5,) * channels,
        name="parquet",
        split=split,
    )


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------

DATA_SOURCES: dict[str, Callable[[Any, str], IndexedImages]] = {
    "fashion-mnist": load_fashion_mnist,
    "digits": load_digits_split,
    "cifar10": lambda cfg, split: load_cifar(cfg, split, num_classes=10),
    "cifar100": lambda cfg, split: load_cifar(cfg, split, num_classes=100),
    "stl10": load_stl10,
    "imagefolder": load_imagefolder,
    "parquet": load_parquet,
}


def load_split(cfg: Any, split: str) -> IndexedImages:
    """Load one split (``"train"`` or ``"test"``) of the data set named by ``cfg.name``.

    Applies ``cfg.subset`` (train) / ``cfg.test_subset`` (test), then resizes in-memory
    splits to ``cfg.image_size`` when set. Item ``i`` of the result is ``(image, i)``. A lazily
    decoded split is checked by decoding a seeded sample of its images.

    Raises:
        DataError (a ConfigError and ValueError): unknown ``data.name`` or split, malformed or
            empty data, an image of the sample that does not decode (BadImageError).
        DataNotFoundError (also a FileNotFoundError): the files are missing (the message says
            how to get them).
    """
    name = getattr(cfg, "name", None)
    if name not in DATA_SOURCES:
        raise DataError(f"data.name: unknown data set {name!r}; choose one of: {', '.join(DATA_SOURCES)}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    ds = DATA_SOURCES[name](cfg, split)
    if len(ds) == 0:
        raise DataError(f"data.root: the {split} split of {name} has no images"
                        + (f" under {_opt(cfg, 'root')}" if _opt(cfg, "root") else ""))
    ds = ds.take(_opt(cfg, "subset") if split == "train" else _opt(cfg, "test_subset"))
    if ds.decoder is not None:
        check_decodes(ds)
    ds = ds.resized(_opt(cfg, "image_size"))
    if split == "train":
        _note(f"data: {name} trains at {ds.image_size}x{ds.image_size}, {ds.channels} channel(s)")
    return ds
