"""Write image-text webdataset shards (img2dataset layout) from digits, caption files, labelled
folders or `datasets`.

Each sample is `{key}.jpg`, `{key}.txt` and `{key}.json` in `{prefix}-NNNNNN.tar`; the output
directory also holds `sizes.json` (shard name -> sample count) so loaders know epoch lengths.
Heavy libraries (scikit-learn, pandas, datasets) are imported only by the prep that needs them.
"""

from data_prep.captions import prep_folder
from data_prep.digits import prep_digits
from data_prep.hf_dataset import prep_hf
from data_prep.labelled import prep_labelled_folder
from data_prep.writer import PrepSummary, ShardWriter

__all__ = ["PrepSummary", "ShardWriter", "prep_digits", "prep_folder", "prep_hf", "prep_labelled_folder"]
