from .proxy_prompt import ProxyPromptConfig

__all__ = ["ProxyPromptConfig"]
