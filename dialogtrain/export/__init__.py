"""The export stage: consolidated Hugging Face folders from a run, a checkpoint or a GGUF file."""
