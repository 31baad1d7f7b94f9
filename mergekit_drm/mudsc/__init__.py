"""MuDSC (arXiv 2403.01753): merging models whose units do not correspond.

``specs`` says which axes move together per architecture, ``similarity`` and
``matching`` are the pure kernels, ``solver`` the coordinate-descent search,
``alignment`` applies the result, ``engine`` gathers weights and activations
for mergekit models, ``method`` is the mergekit adapter, ``cli`` the
``mergekit-mudsc-align`` command.
"""
