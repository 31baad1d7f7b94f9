"""DRM (and MuDSC) merge methods for mergekit.

``import mergekit_drm`` registers the methods in mergekit's registry; it is
idempotent. Users of plain ``mergekit-yaml`` need no import at all: the
installed ``.pth`` hook registers them as soon as mergekit's method registry
is imported (see ``_mergekit_drm_hook.py``).
"""

from mergekit_drm.registration import METHOD_NAMES, register_methods

__version__ = "0.1.0"
__all__ = ["METHOD_NAMES", "register_methods", "__version__"]

register_methods()
