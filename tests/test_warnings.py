"""cp-data's loader raises no torchdata/torch deprecation noise, and hides nothing else."""

import warnings

import pytest
import torch

pytest.importorskip("torchdata")  # the optional hf extra
from torchdata.stateful_dataloader import StatefulDataLoader

from cp_data._warnings import no_set_vital_warning
from cp_data.loader import ContextParallelLoaderConfig

SEQ_LEN = 8
DATASET = [
    dict(
        input_ids=torch.arange(SEQ_LEN) + 10 * i,
        doc_lens=torch.tensor([3, 5]),
        label_mask=torch.ones(SEQ_LEN, dtype=torch.bool),
    )
    for i in range(4)
]


def test_torchdata_still_warns_without_cp_data():
    # What the helper guards against: torch 2.13 deprecates the call StatefulDataLoader makes.
    with pytest.warns(UserWarning, match="'set_vital' is deprecated"):
        StatefulDataLoader(DATASET, batch_size=2)


class Stream(torch.utils.data.IterableDataset):
    def __iter__(self):
        return iter(DATASET)


@pytest.mark.parametrize("dataset", [DATASET, Stream()], ids=["map-style", "iterable"])
def test_loader_iterates_with_user_warnings_as_errors(dataset):
    config = ContextParallelLoaderConfig(batch_size=2, load_balancer="zig_zag", shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # set here, not by pytest's filterwarnings
        loader = config.build(dataset, dp_rank=0, dp_world_size=1, cp_rank=1, cp_world_size=2)
        batches = list(loader)
    assert len(batches) == 2
    # Rank 1 of 2 under zig_zag keeps chunks 1 and 2 of each document (padded to a multiple of 4).
    assert batches[0]["input_ids"][0, :2].tolist() == [1, 2]


def test_only_that_warning_is_silenced():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with no_set_vital_warning():
            warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
            warnings.warn("something else", UserWarning)
            warnings.warn("'set_vital' is deprecated", DeprecationWarning)
        warnings.warn("'set_vital' is deprecated, please do not call", UserWarning)
    assert [(str(w.message), w.category) for w in caught] == [
        ("something else", UserWarning),
        ("'set_vital' is deprecated", DeprecationWarning),
        ("'set_vital' is deprecated, please do not call", UserWarning),
    ]
