from .least_confident import LeastConfident

__all__ = ["LeastConfident"]
