"""The model: dense transformer pieces around the MoE layer. Knows nothing of process groups."""
from train.model.attention import KVCache
from train.model.transformer import ModelOutput, MoETransformer, build_model, new_kv_caches

__all__ = ["MoETransformer", "ModelOutput", "KVCache", "build_model", "new_kv_caches"]
