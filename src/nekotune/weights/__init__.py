"""Model weights as tensors: the base checkpoint (checkpoint.py), a LoRA adapter (adapter.py), their
merge as a tensor-by-tensor view (merged.py, which the GGUF export reads) and the merge stage that
writes it as a model directory (write.py)."""

from nekotune.model.source import MERGE_INFO, merge_info
from nekotune.weights.adapter import Adapter, NotStreamable
from nekotune.weights.checkpoint import BaseCheckpoint, local_model_dir
from nekotune.weights.merged import MergedModel, open_merged
from nekotune.weights.write import WRITTEN_BY, MergeResult, merge, source_paths

__all__ = ["MERGE_INFO", "WRITTEN_BY", "Adapter", "BaseCheckpoint", "MergeResult", "MergedModel", "NotStreamable",
           "local_model_dir", "merge", "merge_info", "open_merged", "source_paths"]
