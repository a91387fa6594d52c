"""Hugging Face import / export of mlgen's transformer (Llama, Mistral, Qwen2, Mixtral, GPT-2;
import only: Mamba-2, Jamba).

``import_hf(path) -> (model_config, model)`` reads a model directory's ``config.json`` and
safetensors weights (streamed into the parameters' shards); ``export_hf(model_config, model,
path)`` writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads with
the same logits. ``mlgen convert import-hf SRC WORKDIR`` / ``export-hf WORKDIR DST`` do the same
for run directories.
"""

from mlgen.convert.exporter import export_hf
from mlgen.convert.importer import import_hf
from mlgen.convert.layout import ARCHITECTURES, ConvertError

__all__ = ["ARCHITECTURES", "ConvertError", "export_hf", "import_hf"]
