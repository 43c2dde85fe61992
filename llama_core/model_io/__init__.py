"""Reading and writing model checkpoints: the machinery behind ``from_pretrained`` and ``save_pretrained``.

(Training checkpoints, with optimizer state, are another thing: ``llama_core.train.checkpoint``.)

Modules, lowest first:
  ``hub``                 a local path, or a Hugging Face hub id fetched with snapshot_download
  ``dtypes``              dtype names users pass, and safetensors' names for dtypes
  ``placement``           device maps for models split across devices; byte sizes such as "5GB"
  ``atomic``              output directories that appear whole or not at all
  ``safetensors_writer``  safetensors files written one tensor at a time, sharded with an index
  ``hf_checkpoint``       an HF checkpoint directory: weight files, tensor headers, a one-pass stream
  ``gguf_file``           a GGUF file (llama.cpp) through the ``gguf`` package: metadata, tensor data
  ``loading``             from_pretrained: any supported checkpoint streamed into a meta-built model
  ``saving``              save_pretrained: config.json + sharded safetensors, atomically

May import: ``llama_core.modeling`` (the config), ``llama_core.quant`` (quantise while loading), torch,
safetensors, huggingface_hub, gguf (optional, lazily). ``loading`` reaches the GGUF, Meta and llama2.c
readers of ``checkpoints_convert`` through documented lazy imports (those converters build on this
package, so the edges point upward).
"""
