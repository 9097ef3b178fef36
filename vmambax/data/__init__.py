"""Data: the PCLT20K layout (SPEC.md section 4), synthetic PET-CT, augmentation."""
from .dataset import (DataError, SliceDataset, derive_val, has_split, patient_of, read_spacing, read_split,
                      scale_image, slice_paths)
from .synth import make_synthetic_dataset
from .transforms import Augmented, augment

__all__ = ["DataError", "SliceDataset", "derive_val", "has_split", "patient_of", "read_spacing", "read_split",
           "scale_image", "slice_paths", "make_synthetic_dataset", "Augmented", "augment"]
