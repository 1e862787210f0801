"""scflashmm.get."""
