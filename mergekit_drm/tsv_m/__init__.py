"""TSV-M (Task Singular Vectors: Merge, arXiv 2412.00081): kernel and mergekit method."""
