"""Sweeps: a set of ordinary runs sharing a base config, generated from a search space
(``spec``: the sweep document, its checks, the points) and driven by one controller at a time
(``controller``: creates trials, prunes, finishes the sweep; its state is only in the
database)."""
