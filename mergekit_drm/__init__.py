"""DRM (and MuDSC) merge methods for mergekit.

Importing the package (or any kernel in it) registers nothing and loads
neither mergekit nor torch. Users of plain ``mergekit-yaml`` need no import at
all: the installed ``.pth`` hook (``mergekit_drm/_hook.py``) registers the
methods as soon as mergekit's method registry is imported. In-process users
without the hook call ``mergekit_drm.register()``; it is idempotent.
"""

from mergekit_drm.registration import METHOD_NAMES, register

# The name of 0.1.0, where ``import mergekit_drm`` also registered.
register_methods = register

__version__ = "0.1.0"
__all__ = ["METHOD_NAMES", "register", "register_methods", "__version__"]
