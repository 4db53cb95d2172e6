"""Data: read interaction logs, split them, batch them.

::

    from plr.data import read_interactions, build_dataset
    inter = read_interactions("../shared/data/amazon2018-videogames_seqrecbench")   # fmt="auto"
    ds = build_dataset(inter, max_len=50, split="loo")
    seq, target = ds.train.gather(torch.randint(0, len(ds.train), (2048,)))
    ds.valid.item_seq, ds.valid.target          # [U, 50], [U]

Item ids are 1..num_items (0 = padding); histories are left-padded.
"""

from .amazon2023 import read_amazon2023
from .dataset import (EvalSamples, SequenceDataset, TrainSamples, build_dataset, check_usable, gather_histories,
                      k_core_filter)
from .download import (AMAZON2023_CATEGORIES, OFFICIAL_BASE_URL, ChecksumError, DownloadError,
                       download_amazon2023, download_file)
from .interactions import DataFormatError, Interactions
from .loading import load_dataset
from .readers import FORMATS, detect_format, read_interactions
from .stats import dataset_stats, format_stats

__all__ = [
    "read_interactions", "detect_format", "read_amazon2023", "FORMATS", "Interactions", "DataFormatError",
    "build_dataset", "check_usable", "load_dataset", "SequenceDataset", "TrainSamples", "EvalSamples",
    "gather_histories", "k_core_filter",
    "dataset_stats", "format_stats",
    "download_amazon2023", "download_file", "DownloadError", "ChecksumError", "OFFICIAL_BASE_URL",
    "AMAZON2023_CATEGORIES",
]
