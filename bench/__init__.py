"""`make bench`: ratios against the baselines a user would pick instead (see bench/__main__.py)."""
