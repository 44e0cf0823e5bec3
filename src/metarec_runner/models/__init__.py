"""Base models: plain ``nn.Module``s split into a shared ``body`` and an adaptable ``head``."""
