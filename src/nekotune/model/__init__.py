"""The model stage: what `--model` names (source.py: one ModelSource, resolved once) and loading it
(load.py: device, precision, tokenizer, weights, adapter)."""

from nekotune.model.load import (
                                 Loaded,
                                 Precision,
                                 attach_adapter,
                                 chat_template_text,
                                 check_quantization,
                                 cpu_has_fast_bf16,
                                 load_for_inference,
                                 load_model,
                                 load_renderer,
                                 load_source,
                                 load_tokenizer,
                                 pick_device,
                                 pick_precision,
                                 require_safetensors_adapter,
)
from nekotune.model.source import (
                                 HubChoice,
                                 ModelSource,
                                 cache_dir,
                                 effective_config,
                                 embedded_gguf,
                                 gguf_to_hf_dir,
                                 merge_info,
                                 resolve,
                                 resolve_base,
                                 resolve_source,
                                 with_merge_info,
)

__all__ = ["HubChoice", "Loaded", "ModelSource", "Precision", "attach_adapter", "cache_dir", "chat_template_text",
           "check_quantization", "cpu_has_fast_bf16", "effective_config", "embedded_gguf", "gguf_to_hf_dir",
           "load_for_inference", "load_model", "load_renderer", "load_source", "load_tokenizer", "merge_info",
           "pick_device",
           "pick_precision", "require_safetensors_adapter", "resolve", "resolve_base", "resolve_source",
           "with_merge_info"]
