"""Built-in plugins. Each module registers itself through the same hooks a third party uses.

The registry loads them by name (``zoo.registry.manager.BUILTIN_MODULES``); nothing else in the
core imports them.
"""
