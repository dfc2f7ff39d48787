"""Hugging Face interop: export moeforge checkpoints as transformers model folders and import them back.

One module per family (`mixtral`, `dbrx`, `deepseek` for V2 and V3) holds that family's config-field and
weight-name tables, each read in both directions; `common` has the shared machinery and `convert` the two
entry points that `scripts/convert_hf.py` calls.
"""
from train.hf.common import HFConversionError
from train.hf.convert import export_checkpoint, import_checkpoint

__all__ = ["HFConversionError", "export_checkpoint", "import_checkpoint"]
