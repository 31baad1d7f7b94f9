"""Quality benchmarks. The modules here: DRM vs mergekit's built-in merges on
real fine-tunes of all-MiniLM-L6-v2, fully offline (README.md in this folder);
``mudsc/``: MuDSC on language models trained from different inits."""
