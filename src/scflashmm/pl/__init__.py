"""scflashmm.pl."""
