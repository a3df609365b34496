"""Segmentation data sets: PASCAL VOC layout, SBD (``cls/*.mat``), and folders of image/label pairs.

Every sample is checked as it is read: the label must have the image's size and hold only class indices or 255
(ignore); a mistake raises a UserError naming the file.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from fcn_fast.data.palette import IGNORE_INDEX, VOC_CLASSES, read_class_names, read_image, read_label
from fcn_fast.data.transforms import Augment, collate, normalize
from fcn_fast.errors import UserError

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
LAYOUTS = ("voc", "sbd", "pairs")


@dataclass(frozen=True)
class Item:
    id: str
    image: str
    label: str


def read_sbd_label(path: str) -> np.ndarray:
    """The class labels of an SBD ``cls/<id>.mat`` file: the ``Segmentation`` field of its ``GTcls`` struct."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as exc:  # scipy raises several types for files that are not MATLAB files
        raise UserError(f"cannot read SBD label {path}: {exc}") from None
    gt = mat.get("GTcls")
    seg = getattr(gt, "Segmentation", None)
    if not isinstance(seg, np.ndarray) or seg.ndim != 2:
        raise UserError(f"{path} is not an SBD class label file (no GTcls.Segmentation matrix)")
    if seg.min() < 0 or seg.max() > 255:
        raise UserError(f"SBD label {path} has values outside 0..255")
    return seg.astype(np.uint8)


def _read_any_label(path: str) -> np.ndarray:
    return read_sbd_label(path) if path.endswith(".mat") else read_label(path)


class SegmentationDataset(Dataset):
    """Samples ``(image (3, H, W) float32, label (H, W) int64, id)`` with the input normalisation of the model
    (``input_transform``) and optional augmentation, whose randomness depends only on (seed, epoch, index)."""

    def __init__(self, items: Sequence[Item], *, class_names: Sequence[str], input_transform: str = "caffe_bgr",
                 augment: Optional[Augment] = None, seed: int = 0, description: str = ""):
        if not items:
            raise UserError(f"{description or 'the data set'} is empty")
        self.items: List[Item] = list(items)
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.input_transform = input_transform
        self.augment = augment if augment else None
        self.seed, self.epoch = seed, 0
        self.description = description

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def load(self, index: int):
        """The raw (H, W, 3) uint8 RGB image and (H, W) uint8 label of a sample, checked."""
        item = self.items[index]
        image = read_image(item.image)
        label = _read_any_label(item.label)
        if image.shape[:2] != label.shape:
            raise UserError(f"label {item.label} is {label.shape[1]}x{label.shape[0]} but its image {item.image} "
                            f"is {image.shape[1]}x{image.shape[0]}")
        bad = np.unique(label[(label >= self.num_classes) & (label != IGNORE_INDEX)])
        if bad.size:
            raise UserError(f"label {item.label} has values {bad.tolist()[:8]} outside the {self.num_classes} "
                            f"classes 0..{self.num_classes - 1} (255 = ignore)")
        return image, label

    def __getitem__(self, index: int):
        image, label = self.load(index)
        x = normalize(image, self.input_transform)
        y = torch.from_numpy(label.astype(np.int64))
        if self.augment is not None:
            seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1, np.uint64)[0]
            x, y = self.augment(x, y, torch.Generator().manual_seed(int(seed)))
        return x, y, self.items[index].id


def detect_layout(root: str) -> str:
    if not os.path.isdir(root):
        raise UserError(f"data folder {root} does not exist")
    if os.path.isdir(os.path.join(root, "ImageSets", "Segmentation")):
        return "voc"
    if os.path.isdir(os.path.join(root, "cls")):
        return "sbd"
    if any(os.path.isdir(os.path.join(root, d, "images")) for d in os.listdir(root)) or \
            os.path.isdir(os.path.join(root, "images")):
        return "pairs"
    raise UserError(f"{root} is not a data set: expected the VOC layout (ImageSets/Segmentation, JPEGImages, "
                    f"SegmentationClass), SBD (cls/, img/, <split>.txt) or image/label pairs (<split>/images, "
                    f"<split>/labels)")


def _read_split(path: str, root: str, layout: str) -> List[str]:
    if not os.path.isfile(path):
        folder = os.path.dirname(path)
        have = sorted(f[:-4] for f in os.listdir(folder) if f.endswith(".txt")) if os.path.isdir(folder) else []
        raise UserError(f"split file {path} does not exist ({layout} data at {root}; splits there: "
                        f"{', '.join(have) or 'none'})")
    with open(path) as f:
        ids = [line.split()[0] for line in f if line.strip()]
    if not ids:
        raise UserError(f"split file {path} lists no images")
    return ids


def _find_image(folder: str, stem: str) -> str:
    for ext in IMAGE_EXTS:
        path = os.path.join(folder, stem + ext)
        if os.path.isfile(path):
            return path
    raise UserError(f"image {os.path.join(folder, stem)}.jpg (or .png) does not exist")


def _need_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"{what} {path} does not exist")
    return path


def _need_dir(path: str) -> str:
    if not os.path.isdir(path):
        raise UserError(f"folder {path} does not exist")
    return path


def list_items(root: str, split: Optional[str]) -> List[Item]:
    """The samples of a split: VOC ``ImageSets/Segmentation/<split>.txt``, SBD ``<split>.txt``, or the pairs in
    ``<split>/images`` + ``<split>/labels`` (``images`` + ``labels`` of the root itself when split is None)."""
    layout = detect_layout(root)
    if layout == "voc":
        ids = _read_split(os.path.join(root, "ImageSets", "Segmentation", f"{split}.txt"), root, layout)
        images, labels = _need_dir(os.path.join(root, "JPEGImages")), _need_dir(os.path.join(root, "SegmentationClass"))
        return [Item(i, _find_image(images, i), _need_file(os.path.join(labels, i + ".png"), "label")) for i in ids]
    if layout == "sbd":
        ids = _read_split(os.path.join(root, f"{split}.txt"), root, layout)
        images, labels = _need_dir(os.path.join(root, "img")), os.path.join(root, "cls")
        return [Item(i, _find_image(images, i), _need_file(os.path.join(labels, i + ".mat"), "label")) for i in ids]
    base = root if split is None else os.path.join(root, split)
    images, labels = os.path.join(base, "images"), os.path.join(base, "labels")
    if not os.path.isdir(images) or not os.path.isdir(labels):
        raise UserError(f"split {split!r} of {root} needs the folders {images} and {labels}")
    stems = sorted(os.path.splitext(f)[0] for f in os.listdir(images) if f.lower().endswith(IMAGE_EXTS))
    if not stems:
        raise UserError(f"{images} holds no .jpg or .png images")
    return [Item(s, _find_image(images, s), _need_file(os.path.join(labels, s + ".png"), "label")) for s in stems]


def class_names_of(root: str) -> Sequence[str]:
    """``class_names.txt`` of a data set (one name a line, in index order), else the 21 VOC classes."""
    path = os.path.join(root, "class_names.txt")
    return read_class_names(path) if os.path.isfile(path) else VOC_CLASSES


def open_dataset(root: str, split: Optional[str], *, input_transform: str = "caffe_bgr",
                 augment: Optional[Augment] = None, seed: int = 0,
                 class_names: Optional[Sequence[str]] = None) -> SegmentationDataset:
    """A data set in any of the supported layouts (detected from the folder)."""
    items = list_items(root, split)
    return SegmentationDataset(items, class_names=class_names or class_names_of(root), input_transform=input_transform,
                               augment=augment, seed=seed, description=f"split {split!r} of {root}")


class ResumableSampler(Sampler):
    """DistributedSampler (also for one process, so that every run shuffles the same way) that can start an epoch
    part-way through, for an exact resume."""

    def __init__(self, dataset, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        self.inner = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner) - self.skip


def shard(n: int, rank: int, world: int) -> List[int]:
    """Every index once over all ranks (no padding, unlike DistributedSampler), for evaluation."""
    return list(range(rank, n, world))


def make_loader(dataset, *, batch_size: int = 1, sampler, workers: int = 0, pin_memory: bool = False):
    """A DataLoader of padded batches. It gets its own generator: by default a DataLoader draws a worker seed from
    the global RNG at every epoch, which would make the training RNG depend on where a run was resumed."""
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                                       collate_fn=collate, pin_memory=pin_memory, generator=torch.Generator())
