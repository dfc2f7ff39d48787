"""Hugging Face interop: export moeforge checkpoints as transformers model folders and import them back.

One module per family (`mixtral`, `dbrx`, `deepseek` for V2 and V3, `qwen_olmoe`, `llama4`; `llama` for dense
import) holds that family's config-field and weight-name tables, each read in both directions. Shared machinery,
one idea a file: `fields` (config translation and the checks families share), `weights` (weight-name tables and
the mapped-everything checks), `expert_layout` (stacked, per-projection, per-Linear and fused expert tensors),
`folders` (safetensors and tokenizer files), `errors`, `rope`. `convert` has the two entry points that
`scripts/convert_hf.py` calls.
"""
from train.hf.convert import export_checkpoint, import_checkpoint
from train.hf.errors import HFConversionError

__all__ = ["HFConversionError", "export_checkpoint", "import_checkpoint"]
