"""The pyfunc model's code (MLflow "models from code"): MLflow runs this file when it loads the
model, so the model is built from code, never unpickled. See :mod:`metarec_runner.serve.pyfunc`."""

from mlflow.models import set_model

from metarec_runner.serve.pyfunc import RecommenderModel

set_model(RecommenderModel())
