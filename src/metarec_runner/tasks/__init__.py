"""Meta-learning tasks: splitters turn Interactions into TaskSets of padded task batches."""
