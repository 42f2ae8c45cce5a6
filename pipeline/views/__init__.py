"""The read side: dataset inspection (funnels, heads, diffs) and the run report."""
