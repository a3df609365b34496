"""Data: VOC / SBD / image-label-pair data sets, the synthetic set, input transforms and batching."""

from fcn_fast.data.datasets import (Item, ResumableSampler, SegmentationDataset, class_names_of, detect_layout,
                                    list_items, make_loader, open_dataset, read_sbd_label, shard)
from fcn_fast.data.palette import (IGNORE_INDEX, VOC_CLASSES, VOC_PALETTE, colorize, label_image, overlay,
                                   read_image, read_label)
from fcn_fast.data.synthetic import make_synthetic
from fcn_fast.data.transforms import CAFFE_BGR_MEAN, IMAGENET_MEAN, IMAGENET_STD, Augment, collate, normalize, pad_batch

__all__ = [
    "Augment", "CAFFE_BGR_MEAN", "IGNORE_INDEX", "IMAGENET_MEAN", "IMAGENET_STD", "Item", "ResumableSampler",
    "SegmentationDataset", "VOC_CLASSES", "VOC_PALETTE", "class_names_of", "collate", "colorize", "detect_layout",
    "label_image", "list_items", "make_loader", "make_synthetic", "normalize", "open_dataset", "overlay", "pad_batch",
    "read_image", "read_label", "read_sbd_label", "shard",
]
