"""Datasets: loaders and generators that return :class:`Interactions`."""
