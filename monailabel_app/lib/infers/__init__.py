from .proxy_prompt import SliceSupportInfer, StudySupportInfer

__all__ = ["SliceSupportInfer", "StudySupportInfer"]
