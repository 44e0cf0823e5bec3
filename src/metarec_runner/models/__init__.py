"""Base models: plain ``nn.Module``s split into a shared ``body`` and an adaptable ``head``.

``preference`` (MeLU, ``model=melu``), ``mf``, ``fm``, ``linear``, ``mlp`` score feature rows on
their own; ``gru`` reads the user's support sequence. ``fields`` holds the shared field
embeddings and the user-vector head. Each model class declares what it provides (``rowwise``,
``head``, ``item_embedding``, ``sequence``) in its ``provides`` class attribute, inherited by
subclasses; which algorithms accept it: ``metarec_runner.algos.compat``.
"""
