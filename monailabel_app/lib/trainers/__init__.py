from .proxy_prompt import ProxyPromptTrain

__all__ = ["ProxyPromptTrain"]
