from trainer.model.gpt import GPT
from trainer.model.layers import DenseLayers, LayerProvider
from trainer.model.shape import ModelShape

__all__ = ["GPT", "DenseLayers", "LayerProvider", "ModelShape"]
