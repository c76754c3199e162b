"""The `dialogtrain` command line: validate options, resolve the DeepSpeed config, write the run
folder and start torchrun.

Nothing here imports torch, deepspeed, transformers or datasets at module level, so `--help` and
`--dry-run` are instant; commands that need them (chat, import-gguf) import them when they run.
"""
