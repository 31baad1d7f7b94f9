"""Registration of this package's methods in mergekit's registry.

mergekit 0.1.5 raises on a duplicate name, and registration can be reached
twice (the import hook, then an explicit ``import mergekit_drm``) or from
several threads, so it checks under a lock first.
"""

from __future__ import annotations

import threading

METHOD_NAMES = ("drm", "mudsc")

_lock = threading.Lock()


def _methods():
    from mergekit_drm.drm.method import drm_merge_method
    from mergekit_drm.mudsc.method import mudsc_merge_method

    return (drm_merge_method, mudsc_merge_method)


def register_methods() -> None:
    """Register every method of this package that is not registered yet."""
    from mergekit import merge_methods

    with _lock:
        present = {method.spec.name for method in merge_methods.registered_methods()}
        for method in _methods():
            if method.spec.name not in present:
                merge_methods.register(method)
