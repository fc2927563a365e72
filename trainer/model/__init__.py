from trainer.model.gpt import GPT, GPTShape, analytic_param_count
from trainer.model.layers import DenseLayers, LayerProvider

__all__ = ["GPT", "GPTShape", "analytic_param_count", "DenseLayers", "LayerProvider"]
