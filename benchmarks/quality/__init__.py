"""Quality benchmark: DRM vs mergekit's built-in merges on real fine-tunes of
all-MiniLM-L6-v2, fully offline. See README.md in this folder."""
