"""ShapeWorld, the embedded model zoo: the scene renderer and captions (:mod:`.render`), the
judge that reads images back (:mod:`.judge`) and the metrics built on it (:mod:`.metrics`)."""

from multifusion.zoo import judge, metrics, render

__all__ = ["judge", "metrics", "render"]
