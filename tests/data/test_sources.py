"""Data sources, the indexed dataset, sharding and batch iteration (all offline, fast)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pcl_ray.data import IndexedImages, iterate_batches, load_split, shard_indices
from pcl_ray.data.idx import read_idx
from pcl_ray.data.sources import DEFAULT_FMNIST_DIR, DIGITS_TRAIN_SIZE


def data_cfg(name: str, **overrides: object) -> SimpleNamespace:
    """A duck-typed stand-in for the config's ``data`` section."""
    fields: dict[str, object] = dict(
        name=name,
        root=None,
        subset=None,
        test_subset=None,
        image_size=None,
        download=False,
        image_column="image",
        label_column="label",
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def write_idx(path: Path, array: np.ndarray, *, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(payload)


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- idx / Fashion-MNIST


def test_read_idx_roundtrip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    write_idx(tmp_path / "img.gz", images)
    out = read_idx(tmp_path / "img.gz", expect_ndim=3)
    assert out.dtype == np.uint8 and out.shape == (5, 4, 3)
    np.testing.assert_array_equal(out, images)
    ints = np.arange(6, dtype=np.int32).reshape(2, 3) - 2
    write_idx(tmp_path / "ints", ints, code=0x0C)
    np.testing.assert_array_equal(read_idx(tmp_path / "ints"), ints)


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "labels", np.arange(4, dtype=np.uint8))
    with pytest.raises(ValueError, match="3 dimensions"):
        read_idx(tmp_path / "labels", expect_ndim=3)
    raw = (tmp_path / "labels").read_bytes()
    (tmp_path / "short").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="payload"):
        read_idx(tmp_path / "short")


def write_fake_fmnist(directory: Path, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels)
        arrays[prefix] = images
    return arrays


def test_fashion_mnist_from_generated_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = write_fake_fmnist(tmp_path)
    monkeypatch.setenv("PCL_RAY_FMNIST_DIR", str(tmp_path))
    train = load_split(data_cfg("fashion-mnist"), "train")
    test = load_split(data_cfg("fashion-mnist", root=str(tmp_path)), "test")
    assert train.tensor is not None and train.tensor.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(train.tensor[:, 0].numpy(), arrays["train"])
    assert len(test) == 5 and test.labels.tolist() == [0, 1, 2, 3, 4]
    assert train.num_classes == 10 and train.channels == 1 and train.image_size == 28


def test_fashion_mnist_missing_files_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        load_split(data_cfg("fashion-mnist", root=str(tmp_path / "nowhere")), "train")
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "nowhere" in str(err.value) and "data.root" in str(err.value)


@pytest.mark.skipif(
    not (Path(DEFAULT_FMNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist not installed ({DEFAULT_FMNIST_DIR} missing)",
)
def test_fashion_mnist_debian_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PCL_RAY_FMNIST_DIR", raising=False)
    train = load_split(data_cfg("fashion-mnist"), "train")
    test = load_split(data_cfg("fashion-mnist"), "test")
    assert train.tensor is not None and train.tensor.shape == (60000, 1, 28, 28)
    assert train.tensor.dtype == torch.uint8
    assert test.tensor is not None and test.tensor.shape == (10000, 1, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.mean == pytest.approx((0.2860,), abs=1e-3) and train.std == pytest.approx((0.3530,), abs=1e-3)
    image, index = train[123]
    assert index == 123 and image.shape == (1, 28, 28)


# ----------------------------------------------------------------------------- digits, subset, errors


def test_digits_split_and_indices() -> None:
    from sklearn.datasets import load_digits

    train = load_split(data_cfg("digits"), "train")
    test = load_split(data_cfg("digits"), "test")
    assert len(train) == DIGITS_TRAIN_SIZE == 1500 and len(test) == 297
    assert train.tensor is not None and train.tensor.shape == (1500, 1, 8, 8) and train.tensor.dtype == torch.uint8
    assert int(train.tensor.max()) == 255 and int(train.tensor.min()) == 0
    target = load_digits().target
    np.testing.assert_array_equal(train.labels, target[:1500])
    np.testing.assert_array_equal(test.labels, target[1500:])
    for i in (0, 7, 1499):
        image, index = train[i]
        assert index == i and torch.equal(image, train.tensor[i])
    assert test[296][1] == 296
    assert train.mean == test.mean and train.std == test.std  # both from the training part
    assert 0.0 < train.mean[0] < 1.0


def test_subset_test_subset_and_resize() -> None:
    cfg = data_cfg("digits", subset=100, test_subset=10, image_size=16)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    full = load_split(data_cfg("digits"), "train")
    assert len(train) == 100 and len(test) == 10
    assert train.image_size == 16 and train[0][0].shape == (1, 16, 16)
    np.testing.assert_array_equal(train.labels, full.labels[:100])
    assert len(load_split(data_cfg("digits", subset=10_000), "train")) == 1500


def test_unknown_name_and_split() -> None:
    with pytest.raises(ValueError, match=r"data\.name.*fashion-mnist.*parquet"):
        load_split(data_cfg("mnist-but-wrong"), "train")
    with pytest.raises(ValueError, match="split"):
        load_split(data_cfg("digits"), "validation")


def test_indexed_images_bounds() -> None:
    ds = IndexedImages(tensor=torch.zeros(3, 1, 2, 2, dtype=torch.uint8), labels=np.zeros(3), num_classes=1,
                       mean=(0.5,), std=(0.5,))  # fmt: skip
    assert ds[-1][1] == 2
    with pytest.raises(IndexError):
        ds[3]


# ----------------------------------------------------------------------------- torchvision sets


@pytest.fixture
def trust_torchvision_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Generated files cannot match torchvision's md5 sums: accept any existing file."""
    import torchvision.datasets.cifar as cifar
    import torchvision.datasets.stl10 as stl10

    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    monkeypatch.setattr(stl10, "check_integrity", lambda path, md5=None: Path(path).is_file())


def write_fake_cifar10(root: Path, per_batch: int = 4) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    rows: dict[str, np.ndarray] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)  # R, G, B planes per row
        labels = list(rng.integers(0, 10, size=per_batch))
        rows[name] = data
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return rows


def test_cifar10_generated(tmp_path: Path, trust_torchvision_files: None) -> None:
    rows = write_fake_cifar10(tmp_path)
    train = load_split(data_cfg("cifar10", root=str(tmp_path)), "train")
    test = load_split(data_cfg("cifar10", root=str(tmp_path)), "test")
    assert train.tensor is not None and train.tensor.shape == (20, 3, 32, 32)
    assert test.tensor is not None and test.tensor.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(train.tensor[0].numpy(), rows["data_batch_1"][0].reshape(3, 32, 32))
    np.testing.assert_array_equal(test.tensor[3].numpy(), rows["test_batch"][3].reshape(3, 32, 32))
    assert train.num_classes == 10 and train.channels == 3 and len(train.mean) == 3
    assert train.classes == [f"class{i}" for i in range(10)]


def test_cifar100_generated(tmp_path: Path, trust_torchvision_files: None) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 6), ("test", 3)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": np.zeros((n, 3072), np.uint8), "fine_labels": list(range(n))}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, f)
    train = load_split(data_cfg("cifar100", root=str(tmp_path), image_size=16), "train")
    assert len(train) == 6 and train.num_classes == 100 and train[0][0].shape == (3, 16, 16)


def test_cifar_missing_says_download(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="data.download"):
        load_split(data_cfg("cifar10", root=str(tmp_path)), "train")


def test_stl10_generated(tmp_path: Path, trust_torchvision_files: None) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    images = {}
    for split, n in (("train", 3), ("test", 2)):
        # On disk: N × 3 × 96 × 96 in column-major (x before y) order, labels 1..10.
        chw = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        chw.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
        (np.arange(n, dtype=np.uint8) + 1).tofile(folder / f"{split}_y.bin")
        images[split] = chw
    np.zeros((1, 3, 96, 96), np.uint8).tofile(folder / "unlabeled_X.bin")
    train = load_split(data_cfg("stl10", root=str(tmp_path)), "train")
    test = load_split(data_cfg("stl10", root=str(tmp_path)), "test")
    assert train.tensor is not None and train.tensor.shape == (3, 3, 96, 96)
    np.testing.assert_array_equal(train.tensor.numpy(), images["train"])
    np.testing.assert_array_equal(test.tensor.numpy(), images["test"])
    assert train.labels.tolist() == [0, 1, 2] and test.labels.tolist() == [0, 1]


# ----------------------------------------------------------------------------- imagefolder, parquet


def make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(4)
    for split, per_class in (("train", 3), ("val", 2)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for j in range(per_class):
                h, w = (30, 40) if j % 2 == 0 else (50, 20)
                array = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                Image.fromarray(array).save(root / split / cls / f"{j}.png")
    # a grayscale file must come out as RGB
    Image.fromarray(np.full((24, 24), 77, np.uint8)).save(root / "train" / "dog" / "gray.png")


def test_imagefolder_lazy(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    train = load_split(data_cfg("imagefolder", root=str(tmp_path), image_size=16), "train")
    test = load_split(data_cfg("imagefolder", root=str(tmp_path), image_size=16), "test")  # falls back to val/
    assert train.tensor is None and len(train) == 7 and len(test) == 4
    assert train.classes == ["cat", "dog"] and train.num_classes == 2
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    for i in range(len(train)):
        image, index = train[i]
        assert index == i and image.shape == (3, 16, 16) and image.dtype == torch.uint8
    gray = next(train[i][0] for i in range(len(train)) if train.decoder.items[i].endswith("gray.png"))
    assert torch.all(gray == 77)
    default = load_split(data_cfg("imagefolder", root=str(tmp_path)), "train")
    assert default.image_size == 224 and default[0][0].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="data.root"):
        load_split(data_cfg("imagefolder"), "train")


def test_imagefolder_trains_at_the_native_size_the_images_share(tmp_path: Path, capsys) -> None:
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((28, 28), 40 * j, np.uint8)).save(tmp_path / "train" / cls / f"{j}.png")
    ds = load_split(data_cfg("imagefolder", root=str(tmp_path)), "train")
    assert ds.image_size == 28 and ds[0][0].shape == (3, 28, 28)  # not upscaled to 224
    out = capsys.readouterr().out
    assert "native 28x28" in out and "trains at 28x28" in out
    # an explicit size wins (its line is printed once per process, maybe by an earlier test already)
    assert load_split(data_cfg("imagefolder", root=str(tmp_path), image_size=16), "train").image_size == 16


def write_parquet(path: Path, images: list[np.ndarray], labels: list[int] | None, *, hf_struct: bool = False) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [png_bytes(a) for a in images]
    if hf_struct:
        column = pa.array([{"bytes": b, "path": None} for b in blobs],
                          type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))  # fmt: skip
    else:
        column = pa.array(blobs, type=pa.binary())
    columns = {"image": column}
    if labels is not None:
        columns["label"] = pa.array(labels, type=pa.int64())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def test_parquet_in_memory_shards(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8) for _ in range(6)]
    write_parquet(tmp_path / "train-00000.parquet", images[:4], [0, 1, 2, 1])
    write_parquet(tmp_path / "train-00001.parquet", images[4:], [2, 0], hf_struct=True)
    write_parquet(tmp_path / "test-00000.parquet", images[:2], None)
    train = load_split(data_cfg("parquet", root=str(tmp_path)), "train")
    test = load_split(data_cfg("parquet", root=str(tmp_path)), "test")
    assert train.tensor is not None and train.tensor.shape == (6, 3, 12, 12)
    for i, array in enumerate(images):
        np.testing.assert_array_equal(train.tensor[i].permute(1, 2, 0).numpy(), array)
    assert train.labels.tolist() == [0, 1, 2, 1, 2, 0] and train.num_classes == 3
    assert test.labels.tolist() == [-1, -1] and test.num_classes == 0
    assert all(0.0 < m < 1.0 for m in train.mean)


def test_parquet_split_dirs_single_file_and_lazy(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    mixed = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in ((10, 14), (20, 8), (9, 9))]
    write_parquet(tmp_path / "train" / "part-0.parquet", mixed, [0, 1, 0])
    write_parquet(tmp_path / "validation" / "part-0.parquet", mixed[:1], [1])
    cfg = data_cfg("parquet", root=str(tmp_path), image_size=8)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.tensor is None and train.channels == 1 and len(train) == 3 and len(test) == 1
    assert [train[i][0].shape for i in range(3)] == [(1, 8, 8)] * 3
    single = load_split(data_cfg("parquet", root=str(tmp_path / "train" / "part-0.parquet"), image_size=8), "train")
    assert len(single) == 3
    with pytest.raises(FileNotFoundError, match="single file"):
        load_split(data_cfg("parquet", root=str(tmp_path / "train" / "part-0.parquet")), "test")
    with pytest.raises(ValueError, match="data.image_column"):
        load_split(data_cfg("parquet", root=str(tmp_path), image_column="img"), "train")


# ----------------------------------------------------------------------------- sharding, batches


@pytest.mark.parametrize("n, world_size", [(10, 3), (7, 1), (5, 8), (1000, 4)])
def test_shard_indices_cover_each_index_once(n: int, world_size: int) -> None:
    shards = [shard_indices(n, r, world_size) for r in range(world_size)]
    merged = np.concatenate(shards)
    assert len(merged) == n and np.array_equal(np.sort(merged), np.arange(n))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    np.testing.assert_array_equal(shards[0], np.arange(n)[0::world_size])
    shuffled = np.concatenate([shard_indices(n, r, world_size, seed=3) for r in range(world_size)])
    assert np.array_equal(np.sort(shuffled), np.arange(n))
    even = [shard_indices(n, r, world_size, even=True) for r in range(world_size)]
    assert {len(s) for s in even} == {n // world_size}
    with pytest.raises(ValueError):
        shard_indices(n, world_size, world_size)


def collect(ds: IndexedImages, indices: np.ndarray | None, **kwargs: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(iterate_batches(ds, indices, **kwargs))  # type: ignore[arg-type]


def test_iterate_batches_in_memory() -> None:
    ds = load_split(data_cfg("digits", subset=103), "train")
    batches = collect(ds, None, batch_size=16, shuffle=True, seed=5, drop_last=False)
    idx = torch.cat([b[1] for b in batches])
    assert idx.dtype == torch.int64 and sorted(idx.tolist()) == list(range(103))
    assert [len(b[1]) for b in batches] == [16] * 6 + [7]
    for images, index in batches:
        assert images.dtype == torch.uint8 and torch.equal(images, ds.tensor[index])
    again = torch.cat([b[1] for b in collect(ds, None, batch_size=16, shuffle=True, seed=5, drop_last=False)])
    other = torch.cat([b[1] for b in collect(ds, None, batch_size=16, shuffle=True, seed=6, drop_last=False)])
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    plain = torch.cat([b[1] for b in collect(ds, None, batch_size=16, shuffle=False, seed=0, drop_last=False)])
    assert plain.tolist() == list(range(103))
    dropped = collect(ds, None, batch_size=16, shuffle=True, seed=5, drop_last=True)
    assert [len(b[1]) for b in dropped] == [16] * 6


def test_iterate_batches_shard_and_lazy(tmp_path: Path) -> None:
    make_image_folder(tmp_path)
    ds = load_split(data_cfg("imagefolder", root=str(tmp_path), image_size=8), "train")
    shard = shard_indices(len(ds), 1, 2)
    batches = collect(ds, shard, batch_size=2, shuffle=True, seed=1, drop_last=False)
    idx = torch.cat([b[1] for b in batches])
    assert idx.dtype == torch.int64 and sorted(idx.tolist()) == shard.tolist()
    for images, index in batches:
        assert images.shape[1:] == (3, 8, 8) and images.dtype == torch.uint8
        assert all(torch.equal(images[j], ds[int(i)][0]) for j, i in enumerate(index))
    again = torch.cat([b[1] for b in collect(ds, shard, batch_size=2, shuffle=True, seed=1, drop_last=False)])
    assert torch.equal(idx, again)


def test_datasets_pickle(tmp_path: Path) -> None:
    """Splits travel to DataLoader workers and Ray workers by pickle."""
    make_image_folder(tmp_path)
    lazy = load_split(data_cfg("imagefolder", root=str(tmp_path), image_size=8), "train")
    eager = load_split(data_cfg("digits", subset=20), "train")
    for ds in (lazy, eager):
        clone = pickle.loads(pickle.dumps(ds))
        assert len(clone) == len(ds) and torch.equal(clone[3][0], ds[3][0])
        np.testing.assert_array_equal(clone.labels, ds.labels)
