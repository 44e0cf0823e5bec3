"""Reading finished runs: MLflow store queries (``store``), comparison tables (``compare``) and
the plots of runs and sweeps (``plots``)."""
