"""The callback protocol, re-exported: it lives in the core, `trainloop.hooks`."""

from trainloop.hooks import HOOKS, Callback, overridden_hooks

__all__ = ["HOOKS", "Callback", "overridden_hooks"]
