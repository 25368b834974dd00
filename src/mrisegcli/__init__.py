"""mriseg: text-prompted medical image segmentation by autoregressive token prediction.

from mrisegcli import Segmenter
seg = Segmenter.load()                       # the shipped chest-radiograph model
masks = seg.segment(["chest.png"], "cardiac silhouette")   # boolean masks at input size
"""

__version__ = "0.1.0"


def __getattr__(name: str):  # the model code loads torch: import it only when asked for
    if name == "Segmenter":
        from mrisegcli.workflow.segmenter import Segmenter

        return Segmenter
    raise AttributeError(f"module 'mrisegcli' has no attribute {name!r}")


__all__ = ["Segmenter", "__version__"]
