"""OpenOOD v1.5 benchmarks: OpenOOD folder layout on a tiny generated tree, tfds on mock data."""

import dataclasses
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from grood_jax.data import DataError, load_benchmark, openood, tfds_sources
from grood_jax.data.openood import load_openood_benchmark, resize_center_crop

CIFAR_SETS = {  # imglist stem -> (folder, n, (w, h), mode)
    "train_cifar10": ("cifar10/train", 12, (32, 32), "RGB"),
    "val_cifar10": ("cifar10/val", 4, (32, 32), "RGB"),
    "test_cifar10": ("cifar10/test", 6, (32, 32), "RGB"),
    "val_tin": ("tin/val", 4, (64, 64), "RGB"),
    "test_cifar100": ("cifar100/test", 3, (32, 32), "RGB"),
    "test_tin": ("tin/test", 3, (64, 64), "RGB"),
    "test_mnist": ("mnist/test", 3, (28, 28), "L"),
    "test_svhn": ("svhn/test", 3, (32, 32), "RGB"),
    "test_texture": ("texture/banded", 3, (48, 40), "RGB"),   # not square: resize + crop
    "test_places365": ("places365/a", 3, (70, 50), "RGBA"),
}


def _write_tree(root, sets=CIFAR_SETS, bench="cifar10", images_dir="images_classic"):
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "benchmark_imglist", bench), exist_ok=True)
  for stem, (folder, n, (w, h), mode) in sets.items():
    d = os.path.join(root, images_dir, folder)
    os.makedirs(d, exist_ok=True)
    lines = []
    for i in range(n):
      shape = (h, w) if mode == "L" else (h, w, len(mode))
      Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(
          os.path.join(d, f"{i:03d}.png"))
      label = i % 10 if stem.endswith(bench) else -1
      lines.append(f"{folder}/{i:03d}.png {label}\n")
    with open(os.path.join(root, "benchmark_imglist", bench, f"{stem}.txt"), "w") as f:
      f.writelines(lines)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("openood"))
  _write_tree(root)
  return root


def test_cifar10_from_openood_folder(cifar_root):
  b = load_openood_benchmark("cifar10", data_root=cifar_root, workers=2)
  assert b.num_classes == 10 and b.image_shape == (32, 32, 3)
  assert b.mean == openood.CIFAR10_MEAN and len(b.std) == 3
  assert (len(b.id_train), len(b.id_val), len(b.id_test)) == (12, 4, 6)
  np.testing.assert_array_equal(b.id_train.labels, np.arange(12) % 10)
  assert [(s.name, s.group, len(s.data)) for s in b.ood] == [
      ("cifar100", "near", 3), ("tin", "near", 3), ("mnist", "far", 3), ("svhn", "far", 3),
      ("texture", "far", 3), ("places365", "far", 3)]
  assert all(s.data.images.shape[1:] == (32, 32, 3) for s in b.ood)
  assert b.ood_val.name == "tin_val" and len(b.ood_val) == 4 and b.ood_val.labels is None
  assert b.noise.images.shape == (1000, 32, 32, 3)
  # ID images at 32x32 are stored unchanged
  ref = np.asarray(Image.open(os.path.join(cifar_root, "images_classic/cifar10/train/003.png")))
  np.testing.assert_array_equal(b.id_train.images[3], ref)
  # grey MNIST -> RGB by replication, then 28 -> 32
  m = b.ood[2].data.images
  np.testing.assert_array_equal(m[..., 0], m[..., 1])
  # texture 48x40 (w x h): shorter side 40 -> 32, width int(32*48/40)=38, centre crop at x=3
  with Image.open(os.path.join(cifar_root, "images_classic/texture/banded/001.png")) as img:
    resized = np.asarray(img.convert("RGB").resize((38, 32), Image.BILINEAR))
  np.testing.assert_array_equal(b.ood[4].data.images[1], resized[:, 3:35])


def test_registry_and_options(cifar_root):
  b = load_benchmark("cifar10", data_dir=cifar_root)          # data_dir is searched
  assert len(b.id_test) == 6
  opts = openood.Options(max_per_set=2, data_root=cifar_root)
  b2 = load_benchmark("cifar10", options=opts)
  assert len(b2.id_train) == 2 and all(len(s.data) == 2 for s in b2.ood)
  sub = b2.id_train.images
  full = b.id_train.images
  assert any((full == sub[0]).all(axis=(1, 2, 3)))       # a subset of the same images
  assert np.array_equal(load_benchmark("cifar10", options=opts).id_train.images, sub)  # seeded
  # options are passed in, never left behind: the next load without them is full size
  assert len(load_benchmark("cifar10", data_dir=cifar_root).id_train) == 12
  assert not hasattr(openood, "OPTIONS") and not hasattr(openood, "configure")
  with pytest.raises(dataclasses.FrozenInstanceError):
    opts.max_per_set = 3
  with pytest.raises(TypeError):
    openood.Options(max_per_sets=3)
  with pytest.raises(DataError, match="unknown data source"):
    openood.Options(source="hf")
  with pytest.raises(DataError, match="max_per_set must be a positive integer"):
    openood.Options(max_per_set=0)
  with pytest.raises(DataError, match="unknown data source"):
    load_openood_benchmark("cifar10", source="hf", data_root=cifar_root)
  # builders that take no options (the Fashion-MNIST ones, registered ones) ignore them
  from grood_jax.data import benchmarks
  assert benchmarks._takes_options(benchmarks.benchmark_builder("cifar10"))
  assert not benchmarks._takes_options(benchmarks._fashion_mnist_6v4)


def test_openood_is_registered_lazily_without_an_import_cycle():
  """benchmarks.py names the OpenOOD benchmarks ("module:function", imported on first use)
  without importing openood.py, which imports benchmarks.py: no import cycle, and openood.py
  registers nothing at import time."""
  import subprocess
  import sys
  code = ("import sys; from grood_jax.data import benchmarks as b; "
          "assert {'cifar10', 'cifar100', 'imagenet200', 'imagenet1k'} <= set(b.benchmark_names()); "
          "fn = b.benchmark_builder('cifar10'); from grood_jax.data import openood; "
          "assert fn is openood.cifar10; "
          "assert set(b.LAZY) == set(openood.SPECS), (sorted(b.LAZY), sorted(openood.SPECS))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr
  src = open(benchmarks_path()).read()
  assert "import openood" not in src and "from grood_jax.data import openood" not in src
  assert "register_benchmark" not in open(openood.__file__).read()


def benchmarks_path():
  from grood_jax.data import benchmarks
  return benchmarks.__file__


def test_allow_missing_one_warning_naming_every_dropped_set(tmp_path):
  root = str(tmp_path / "partial")
  _write_tree(root, {k: v for k, v in CIFAR_SETS.items()
                     if k not in ("test_svhn", "test_mnist", "val_tin")})
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    b = load_benchmark("cifar10", options=openood.Options(data_root=root, allow_missing=True))
  msgs = [str(x.message) for x in w]
  assert len(msgs) == 1, msgs
  assert "mnist" in msgs[0] and "svhn" in msgs[0] and "OOD val set tin" in msgs[0]
  assert "dropped 3" in msgs[0]
  assert [s.name for s in b.ood] == ["cifar100", "tin", "texture", "places365"]
  assert b.ood_val is None


def test_tfds_size_is_gone():
  assert not hasattr(tfds_sources, "tfds_size")


def test_missing_list_and_image(cifar_root, tmp_path):
  with pytest.raises(DataError, match=r"benchmark_imglist/cifar100/train_cifar100\.txt"):
    load_openood_benchmark("cifar100", data_root=cifar_root)
  root = str(tmp_path / "broken")
  _write_tree(root, {k: v for k, v in CIFAR_SETS.items() if k != "test_svhn"})
  with pytest.raises(DataError, match=r"test_svhn\.txt not found"):
    load_openood_benchmark("cifar10", data_root=root)
  with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    b = load_openood_benchmark("cifar10", data_root=root, allow_missing=True)
  assert "svhn" not in [s.name for s in b.ood] and any("svhn" in str(x.message) for x in w)
  _write_tree(root)
  os.remove(os.path.join(root, "images_classic/tin/test/001.png"))
  with pytest.raises(DataError, match=r"images_classic/tin/test/001\.png is missing"):
    load_openood_benchmark("cifar10", data_root=root)


def test_imagenet_layout_textures_in_classic(tmp_path, monkeypatch):
  monkeypatch.setattr(openood, "NOISE_SIZE", 10)             # 1000 x 224^2 noise is slow here
  root = str(tmp_path)
  large = {"train_imagenet200": ("imagenet_1k/train/n01", 3, (300, 260), "RGB"),
           "val_imagenet200": ("imagenet_1k/val", 2, (256, 256), "RGB"),
           "test_imagenet200": ("imagenet_1k/val", 2, (256, 256), "RGB"),
           "val_openimage_o": ("openimage_o/images", 2, (230, 300), "RGB"),
           "test_ssb_hard": ("ssb_hard/a", 1, (256, 300), "RGB"),
           "test_ninco": ("ninco/b", 1, (260, 260), "RGB"),
           "test_inaturalist": ("inaturalist/images", 1, (256, 256), "RGB"),
           "test_openimage_o": ("openimage_o/images", 1, (400, 256), "RGB")}
  _write_tree(root, large, bench="imagenet200", images_dir="images_largescale")
  _write_tree(root, {"test_textures": ("texture/x", 2, (300, 300), "RGB")},
              bench="imagenet200", images_dir="images_classic")
  b = load_openood_benchmark("imagenet200", data_root=root, workers=2)
  assert b.num_classes == 200 and b.image_shape == (224, 224, 3)
  assert b.mean == openood.IMAGENET_MEAN
  assert [s.name for s in b.ood] == ["ssb_hard", "ninco", "inaturalist", "textures",
                                     "openimage_o"]
  assert b.ood_val.name == "openimage_o_val" and b.id_train.images.shape == (3, 224, 224, 3)
  with pytest.raises(DataError, match="--data openood"):
    load_openood_benchmark("imagenet200", source="tfds", data_root=root)


def test_resize_center_crop_matches_torchvision_rule():
  img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), np.uint8))
  out = resize_center_crop(img, 256, 224)
  ref = np.asarray(img.resize((341, 256), Image.BILINEAR))   # int(256 * 400 / 300) = 341
  top, left = int(round((256 - 224) / 2)), int(round((341 - 224) / 2))
  np.testing.assert_array_equal(out, ref[top:top + 224, left:left + 224])


# ----------------------------------------------------------------------------- tfds


def _mock():
  tfds = pytest.importorskip("tensorflow_datasets")
  return tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE)


def test_tfds_source_without_tensorflow(cifar_root):
  """tfds mock data through data_source (no TensorFlow installed); TIN comes from the folder."""
  with _mock():
    b = load_openood_benchmark("cifar10", source="tfds", data_root=cifar_root, val_fraction=0.4)
  assert len(b.id_train) + len(b.id_val) == 30 and len(b.id_test) == 30
  assert len(b.id_val) > 0 and len(b.id_train) > 0
  assert b.id_train.images.shape[1:] == (32, 32, 3) and b.id_train.labels.dtype == np.int32
  sizes = {s.name: len(s.data) for s in b.ood}
  assert sizes == {"cifar100": 30, "tin": 3, "mnist": 30, "svhn": 30, "texture": 90,
                   "places365": 30}
  assert all(s.data.images.shape[1:] == (32, 32, 3) for s in b.ood)
  assert len(b.ood_val) == 4                                  # val_tin from the folder


def test_tfds_missing_sets(tmp_path):
  with _mock():
    with pytest.raises(DataError, match=r"test_tin\.txt.*--data-root"):
      load_openood_benchmark("cifar10", source="tfds", data_dir=str(tmp_path),
                             val_fraction=0.4)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      b = load_openood_benchmark("cifar10", source="tfds", data_dir=str(tmp_path),
                                 allow_missing=True, val_fraction=0.4)
    small = tfds_sources.load_tfds("dtd", ["test"], name="dtd", max_n=4, labels=False,
                                   preprocess=openood._array_preprocess(32, 32))
  assert b.ood_val is None and "tin" not in [s.name for s in b.ood]
  assert len(b.ood) == 5 and b.num_classes == 10
  assert small.images.shape == (4, 32, 32, 3) and small.labels is None


def test_tfds_not_prepared(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataError, match="tfds dataset 'cifar10' split 'train' is not prepared"):
    load_openood_benchmark("cifar10", source="tfds", tfds_data_dir=str(tmp_path))
