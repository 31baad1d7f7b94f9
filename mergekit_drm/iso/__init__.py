"""Iso-C and Iso-CTS (isotropic merging, arXiv 2502.04959): kernels and mergekit methods."""
