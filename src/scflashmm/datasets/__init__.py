"""scflashmm.datasets."""
