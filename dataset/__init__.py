"""CIFAR-100 on tensors: load, verify and download it, split it, augment it on the device, sample CRD's
contrast indices."""

from .batch import Batch
from .cifar100 import CIFAR100, DataError, load_cifar100, resolve_data_folder, split_indices
from .crd import CRDSampler
from .loader import CIFAR100_MEAN, CIFAR100_STD, DeviceLoader, EpochPlan, augment, normalize

__all__ = [
    "CIFAR100",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "Batch",
    "CRDSampler",
    "DataError",
    "DeviceLoader",
    "EpochPlan",
    "augment",
    "load_cifar100",
    "normalize",
    "resolve_data_folder",
    "split_indices",
]
