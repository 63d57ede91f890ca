"""The seven CMCL datasets' sizes as the paper describes them (Table 1, Appendix A.2).

Only the ``synthetic`` backbone uses this table, to simulate each dataset at its real size. The
facts of real data live where they are true: each reader declares its modalities and classes
(:mod:`cmcl.data.readers`), each shard stores what it holds, and a protocol says which metrics it
scores (checked against the shards when a run starts). Sizes are the paper's; where the paper gives
only a total, the split is ours and marked ``assumed``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts of one dataset.

    Attributes:
        name: cache name, e.g. ``"vggsound_s"``.
        modalities: modalities in the reference declaration order.
        n_classes: number of classes (0 when the dataset has no class labels).
        train, test: number of pairs in each split.
        note: provenance of the numbers.
    """

    name: str
    modalities: tuple[str, ...]
    n_classes: int
    train: int
    test: int
    note: str = ""


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo("ucf101", ("text", "video"), 101, 7070, 1010,
                    "70 train / 10 test clips per class (paper A.2)"),
        DatasetInfo("esc50", ("text", "audio"), 50, 1600, 400,
                    "4:1 split of 2,000 clips (paper A.2)"),
        DatasetInfo("nyudv2", ("vision", "depth"), 0, 47584, 654,
                    "fast-depth train / official val (paper A.2)"),
        DatasetInfo("clotho", ("text", "audio"), 0, 3840, 1045,
                    "development / evaluation sets, one caption per clip (paper A.2)"),
        DatasetInfo("vggsound_s", ("text", "audio", "video"), 309, 10000, 2000,
                    "10,000 / 2,000 subset of VGGSound (paper A.2)"),
        DatasetInfo("tvl", ("vision", "text", "tactile"), 0, 39367, 4374,
                    "43,741 pairs in all (paper Table 1); the 90/10 split is assumed"),
        DatasetInfo("llvip", ("vision", "thermal"), 0, 12025, 3463,
                    "official 12,025 / 3,463 split of 15,488 pairs"),
    )
}
