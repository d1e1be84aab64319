"""Other tools' config names, accepted as aliases of nekotune's nested keys.

Users arrive with configs and command lines written for Hugging Face `TrainingArguments` and
peft's `LoraConfig`, for "LoRA framework" style flat YAML, for the Alpaca kit's
`--model_id X --data_path Y` scripts (alpaca-lora, qlora and TRL use the same names) and for
LLaMA-Factory. This module is plain data plus two passes over it:

- `translate(raw, source)`: a config mapping (YAML or parsed `key=value` overrides) -> nekotune's
  nested mapping plus one note per translated key ("learning_rate -> train.lr"). Keys with no
  nekotune meaning are either refused (a UserError naming the key and what to do) or accepted with
  a warning note saying why they do not matter; they are never dropped silently. Keys this module
  does not know are left in place for config validation, whose error names them.
- `normalize_argv(argv)`: `--learning_rate 1e-4` / `--learning_rate=1e-4` / a bare `--load_in_4bit`
  -> `learning_rate=1e-4` / `load_in_4bit=true`, only for names that are config keys or aliases, so
  nekotune's own options (--model, --out, --dtype ...) are never taken.

No heavy imports: config validation calls this before anything else is loaded.
"""

from nekotune.aliases.argv import RESERVED, normalize_argv, suggest
from nekotune.aliases.tables import ALIASES, CONTEXTUAL, HARMLESS_DEFAULTS, IGNORED, SAME_NAME, UNSUPPORTED, known_names
from nekotune.aliases.translate import get_dotted, set_dotted, translate
from nekotune.aliases.values import SECTIONS, SKIP, Alias, Note

__all__ = ["ALIASES", "CONTEXTUAL", "HARMLESS_DEFAULTS", "IGNORED", "RESERVED", "SAME_NAME", "SECTIONS", "SKIP",
           "UNSUPPORTED", "Alias", "Note", "get_dotted", "known_names", "normalize_argv", "set_dotted", "suggest",
           "translate"]
